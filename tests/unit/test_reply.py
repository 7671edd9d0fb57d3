"""`Reply`: SMTP replies parsed from the upstream's lines, classified by their code, and formatted again
for the wire and for the relay's client."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbound_relay.errors import RouteMisconfigured, UpstreamAuthFailed
from outbound_relay.reply import Reply, ReplyClass
from outbound_relay.session import ReplyReader


def test_one_line_reply_with_enhanced_status() -> None:
    reply = Reply.parse([b"250 2.1.5 Ok"])
    assert reply == Reply(250, "2.1.5", ("Ok",))
    assert reply.one_line() == str(reply) == "250 2.1.5 Ok"


def test_multiline_reply_takes_the_status_from_each_line() -> None:
    reply = Reply.parse([b"550-5.7.1 Relaying denied", b"550-5.7.1", b"550 5.7.1 see https://example.org"])
    assert reply == Reply(550, "5.7.1", ("Relaying denied", "", "see https://example.org"))
    assert reply.one_line() == "550 5.7.1 Relaying denied see https://example.org"
    assert reply.wire_lines() == [
        b"550-5.7.1 Relaying denied",
        b"550-5.7.1",
        b"550 5.7.1 see https://example.org",
    ]


def test_lines_without_the_status_keep_their_text() -> None:
    reply = Reply.parse([b"250-2.0.0 first", b"250 second, 2.0.0 not at the start"])
    assert reply == Reply(250, "2.0.0", ("first", "second, 2.0.0 not at the start"))


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"250 5.0.0 not this reply's class", None),  # RFC 3463: the status class is the reply's own
        (b"354 Go ahead", None),
        (b"354 3.0.0 no enhanced status has class 3", None),
        (b"250 2.0.0", "2.0.0"),
        (b"250 2.0.0x is text", None),
        (b"451 4.4.1000 too many digits", None),
        (b"451 4.10.123 three digits each", "4.10.123"),
    ],
)
def test_enhanced_status_only_where_rfc_3463_puts_it(line: bytes, status: str | None) -> None:
    assert Reply.parse([line]).status == status


def test_bare_code_and_trailing_white_space() -> None:
    assert Reply.parse([b"250"]) == Reply(250, None, ("",))
    assert Reply.parse([b"250 \t"]) == Reply(250, None, ("",))
    assert Reply.parse([b"221 2.0.0 Bye \r"]).one_line() == "221 2.0.0 Bye"
    assert Reply.parse([b"250"]).one_line() == "250"


def test_the_last_line_gives_the_code() -> None:
    assert Reply.parse([b"250-first", b"451 4.3.0 second"]).code == 451


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"hello there",
        b"25",
        b"25 short",
        b"2500 long",
        b"250x",
        b"199 too low",
        b"600 too high",
        b" 250 x",
    ],
)
def test_what_is_not_a_reply_line_is_refused_by_name(line: bytes) -> None:
    with pytest.raises(ValueError, match="not an SMTP reply line") as refused:
        Reply.parse([b"250-fine", line])
    assert repr(line[:80]) in str(refused.value)


def test_no_lines_is_no_reply() -> None:
    with pytest.raises(ValueError, match="at least one line"):
        Reply.parse([])


def test_undecodable_text_survives_the_round_trip() -> None:
    line = b"250 caf\xe9 \xff"
    reply = Reply.parse([line])
    assert reply.wire_lines() == [line]


@pytest.mark.parametrize(
    ("code", "klass", "flags"),
    [
        (250, ReplyClass.POSITIVE_COMPLETION, (True, False, False, False)),
        (354, ReplyClass.POSITIVE_INTERMEDIATE, (False, True, False, False)),
        (421, ReplyClass.TRANSIENT_NEGATIVE, (False, False, True, False)),
        (554, ReplyClass.PERMANENT_NEGATIVE, (False, False, False, True)),
    ],
)
def test_classes(code: int, klass: ReplyClass, flags: tuple[bool, bool, bool, bool]) -> None:
    reply = Reply.of(code, None, "text")
    assert reply.reply_class is klass
    assert (reply.is_positive, reply.is_intermediate, reply.is_transient, reply.is_permanent) == flags


def test_relay_errors_carry_their_reply() -> None:
    error = RouteMisconfigured("no gateway for\n  domain x")
    assert error.reply == Reply(451, "4.3.5", ("no gateway for\n  domain x",))
    assert error.reply.one_line() == "451 4.3.5 no gateway for domain x"  # one line, whatever the text
    assert error.temporary
    assert UpstreamAuthFailed("refused").reply.is_transient


# -- properties ---------------------------------------------------------------------------------------

_codes = st.integers(min_value=200, max_value=599)
_statuses = st.builds(
    lambda klass, subject, detail: f"{klass}.{subject}.{detail}",
    st.sampled_from("245"),
    st.integers(0, 999),
    st.integers(0, 999),
)
# Anything but the line feed that ends a line, rich in what parsers trip on; a status code in front of some.
_pieces = st.one_of(
    st.binary(min_size=1, max_size=4),
    st.sampled_from([b" ", b"\t", b"\r", b"\x00", b"\xc3\xa9", b"\xff", b"2.0.0", b"4.4.1 "]),
)
_free_text = st.lists(_pieces, max_size=10).map(lambda parts: b"".join(parts).replace(b"\n", b""))
_texts = st.one_of(
    _free_text,
    st.tuples(_statuses, _free_text).map(lambda pair: pair[0].encode() + b" " + pair[1]),
    _statuses.map(str.encode),
)


@st.composite
def reply_lines(draw: st.DrawFn) -> list[bytes]:
    """The lines of one reply as any server might send them: the last line's code ends it, the others
    are continuation lines with any code; the text after the code is arbitrary."""
    count = draw(st.integers(1, 4))
    lines = [str(draw(_codes)).encode() + b"-" + draw(_texts) for _ in range(count - 1)]
    last = str(draw(_codes)).encode() + draw(st.sampled_from([b"", b" "]))
    return [*lines, last + (draw(_texts) if last.endswith(b" ") else b"")]


@settings(deadline=None)
@given(reply_lines())
def test_parse_and_wire_lines_round_trip_and_keep_the_class(lines: list[bytes]) -> None:
    reply = Reply.parse(lines)
    assert reply.code == int(lines[-1][:3])
    assert reply.reply_class == ReplyClass(int(lines[-1][:1]))
    assert len(reply.lines) == len(lines)
    again = Reply.parse(reply.wire_lines())
    assert again == reply
    assert again.reply_class == reply.reply_class


@settings(deadline=None)
@given(reply_lines())
def test_one_line_is_one_line_of_the_same_code_and_class(lines: list[bytes]) -> None:
    reply = Reply.parse(lines)
    line = reply.one_line()
    assert "\n" not in line and "\r" not in line
    again = Reply.parse([line.encode("utf-8", "surrogateescape")])
    assert (again.code, again.reply_class) == (reply.code, reply.reply_class)
    if reply.status is not None:
        assert again.status == reply.status


@settings(deadline=None)
@given(st.lists(reply_lines(), min_size=1, max_size=4), st.data())
def test_reader_gives_the_same_replies_however_the_bytes_are_cut(
    replies: list[list[bytes]], data: st.DataObject
) -> None:
    wire = b"".join(line + b"\r\n" for lines in replies for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))

    async def read_all() -> list[Reply]:
        reader = ReplyReader()
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            reader.data_received(wire[start:end])
        return [await reader.read(1) for _ in replies]

    assert asyncio.run(read_all()) == [Reply.parse(lines) for lines in replies]
