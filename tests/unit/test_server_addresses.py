"""The relay's fast path for MAIL FROM / RCPT TO arguments must say exactly what aiosmtpd's parser says,
and addresses it leaves to the full parsers must still be relayed as the client wrote them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from outbound_relay.server import _TrackedSMTP
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream

ARGUMENTS = [
    "<a@b.com>",
    "<a@b.com> SIZE=100",
    "<a@b.com>  BODY=8BITMIME SMTPUTF8",
    "<a@b.com>\tSIZE=1",
    "<A.B+c_d@Ex-ample.COM>",
    "<o'neil!#$%&*/=?^`{|}~@x.y>",
    "<a@b.com>x",
    "<a@b.com> (comment) SIZE=1",
    '<a@b.com> "q"',
    "<>",
    "<a..b@c>",
    "<.a@c>",
    "<a.@c>",
    "<a@[127.0.0.1]>",
    "<a@b.>",
    "<a@b..c>",
    '<"x y"@b>',
    "<@relay.example:a@b>",
    "< a@b>",
    "<a@b >",
    "<a@b",
    "a@b",
    "<a b@c>",
    "<a@b@c>",
    "<ü@b.com>",
    "",
]


def parsers() -> tuple[_TrackedSMTP, SMTP]:
    # _getaddr reads nothing but local_part_limit and the session (None: before EHLO, so no DSN
    # parameters are lifted out); no loop is needed to call it.
    tracked = object.__new__(_TrackedSMTP)
    tracked.session = None
    return tracked, object.__new__(SMTP)


def outcome(parser: SMTP, arg: str) -> object:
    try:
        return parser._getaddr(arg)
    except Exception as error:  # aiosmtpd's own parser fails on some junk (a lone "<"); so must we
        return type(error)


@pytest.mark.parametrize("arg", ARGUMENTS)
def test_fast_path_agrees_with_aiosmtpd(arg: str) -> None:
    ours, theirs = parsers()
    assert ours._getaddr(arg) == theirs._getaddr(arg)


def test_fast_path_agrees_with_aiosmtpd_on_random_arguments() -> None:
    ours, theirs = parsers()
    rng = random.Random(8)
    alphabet = 'ab.@<> \t()"\\-+_=!#[]:;,xyz09Ü'
    for _ in range(5000):
        arg = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))).strip()
        if rng.random() < 0.5:
            arg = "<" + arg
        assert outcome(ours, arg) == outcome(theirs, arg), arg


def test_local_part_limit_still_applies() -> None:
    ours, theirs = parsers()
    ours.local_part_limit = theirs.local_part_limit = 3
    assert ours._getaddr("<abcd@b.com>") == theirs._getaddr("<abcd@b.com>") == (None, None)


async def test_quoted_local_part_is_relayed_as_written(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ['"john doe"@example.com'], message(), mail_from="a.b@x.org")
            assert outcome.code == 250, outcome
    [received] = up.received
    assert received.rcpt_tos == ('"john doe"@example.com',)
    assert received.mail_from == "a.b@x.org"
