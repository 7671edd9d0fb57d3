"""SMTP replies as values: a code, an RFC 3463 enhanced status code and the text lines, classified by
the code's first digit (RFC 5321 4.2.1). The upstream's replies are parsed here, and the relay's own
answers to its client are built and formatted from the same type."""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple


class ReplyClass(IntEnum):
    """The first digit of a reply code (RFC 5321 4.2.1)."""

    POSITIVE_COMPLETION = 2  # done
    POSITIVE_INTERMEDIATE = 3  # go on (354 after DATA, 334 in AUTH)
    TRANSIENT_NEGATIVE = 4  # not now: the client keeps the message and retries
    PERMANENT_NEGATIVE = 5  # never: the client gives up on the message


_WHITE = b" \t\r"
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_REPLY_LINE = 510
# What may go into a reply line or a log line as it is: printable US-ASCII. Anything else, from the
# upstream, a hook or a header (8-bit text, NUL, other controls), is shown as "?".
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\r?\Z)")
# RFC 3463 2: class "." subject "." detail, the class being the reply's own (2, 4 or 5); RFC 2034 puts it
# first in the text of each line, followed by a space. Matched from the text's start, after the code.
_ENHANCED_STATUS = re.compile(rb"[ \t\r]*([245]\.[0-9]{1,3}\.[0-9]{1,3})(?= |[ \t\r]*\Z)")


class Reply(NamedTuple):
    code: int  # 200 to 599
    status: str | None  # the enhanced status code, "2.0.0", when the reply gives one
    lines: tuple[str, ...]  # the text of each line, without code and status; at least one, maybe ""

    @classmethod
    def of(cls, code: int, status: str | None, text: str) -> Reply:
        """A one-line reply of the relay's own."""
        return cls(code, status, (text,))

    @classmethod
    def parse(cls, lines: Sequence[bytes]) -> Reply:
        """One reply from its lines as they came (`250-first`, ..., `250 last`, without the LF; a CR
        before it is dropped). The last line's code is the reply's; text is UTF-8, with undecodable bytes
        kept as surrogate escapes.

        Raises ValueError naming what is wrong when a line is not `ddd`, `ddd text` or `ddd-text` with a
        code from 200 to 599."""
        if not lines:
            raise ValueError("a reply has at least one line")
        for line in lines:
            if _REPLY_LINE.match(line) is None:
                raise ValueError(f"not an SMTP reply line: {line[:80]!r}")
        first, last = lines[0], lines[-1]
        match = _ENHANCED_STATUS.match(first, 4)
        if match is None or match[1][0] != last[0]:
            texts = [_decode(line[4:].strip(_WHITE)) for line in lines]
            return tuple.__new__(cls, (int(last[:3]), None, tuple(texts)))
        status = match[1]
        texts = [_decode(first[match.end() :].strip(_WHITE))]
        for line in lines[1:]:
            text = line[4:].strip(_WHITE)
            if text == status:
                text = b""
            elif text.startswith(status + b" "):
                text = text[len(status) + 1 :].lstrip(_WHITE)
            texts.append(_decode(text))
        return tuple.__new__(cls, (int(last[:3]), status.decode("ascii"), tuple(texts)))

    @property
    def reply_class(self) -> ReplyClass:
        return ReplyClass(self.code // 100)

    @property
    def is_positive(self) -> bool:
        """2xx: the command is done (accepted, delivered)."""
        return self.code // 100 == ReplyClass.POSITIVE_COMPLETION

    @property
    def is_intermediate(self) -> bool:
        """3xx: the command waits for more (354 after DATA)."""
        return self.code // 100 == ReplyClass.POSITIVE_INTERMEDIATE

    @property
    def is_transient(self) -> bool:
        """4xx: refused for now; a client retries later."""
        return self.code // 100 == ReplyClass.TRANSIENT_NEGATIVE

    @property
    def is_permanent(self) -> bool:
        """5xx: refused for good."""
        return self.code // 100 == ReplyClass.PERMANENT_NEGATIVE

    @property
    def text(self) -> str:
        """The text of all lines as one line: white space runs become one space."""
        return " ".join(" ".join(self.lines).split())

    def one_line(self) -> str:
        """The reply as the relay gives it to its client: one line of printable ASCII of at most 510
        octets (what an aiosmtpd handler returns), with the code and status kept."""
        head = f"{self.code} {self.status}" if self.status else str(self.code)
        text = printable(self.text, MAX_REPLY_LINE - len(head) - 1)
        return f"{head} {text}" if text else head

    def wire_lines(self) -> list[bytes]:
        """The reply as a server sends it, one line per text line, the status code on each (RFC 2034),
        without CRLF: `Reply.parse` of these gives back this reply."""
        last = len(self.lines) - 1
        prefix = f"{self.status} " if self.status else ""
        return [
            f"{self.code}{' ' if i == last else '-'}{prefix}{text}".rstrip(" ").encode(
                "utf-8", "surrogateescape"
            )
            for i, text in enumerate(self.lines)
        ]

    def __str__(self) -> str:
        return self.one_line()


def printable(text: str, limit: int = MAX_REPLY_LINE) -> str:
    """`text` safe for one reply or log line: white space runs become one space, any other character
    outside printable US-ASCII becomes "?", and the result is cut to `limit` characters ("..." marks
    the cut)."""
    text = _NOT_PRINTABLE.sub("?", " ".join(text.split()))
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _decode(text: bytes) -> str:
    return text.decode("utf-8", "surrogateescape")
