"""The few things the relay reads or changes in a message: its header block and the binding header."""

from __future__ import annotations

import email.parser
import email.policy
import re
from email.message import Message

_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
# C0 controls (CR, LF and NUL among them) and DEL: none has a place in an envelope address (RFC 5321
# 4.1.2, RFC 6531 3.3), and CR or LF would end the command line it is written in.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def address_defect(address: str) -> str | None:
    """Why `address` must not go into a MAIL FROM or RCPT TO line, or None when it may."""
    match = _CONTROL.search(address)
    if match is None:
        return None
    return f"contains the control character {match[0]!r} at offset {match.start()}"


def split_headers(content: bytes) -> tuple[bytes, bytes]:
    """(header block with its line endings, the blank line and body); a message without body is all header."""
    if content.startswith((b"\r\n", b"\n")):
        return b"", content
    match = _END_OF_HEADERS.search(content)
    if match is None:
        return content, b""
    cut = match.start() + (2 if content[match.start()] == 0x0D else 1)
    return content[:cut], content[cut:]


def parse_headers(header_block: bytes) -> Message:
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    return parser.parsebytes(header_block)


def pop_header(content: bytes, name: str) -> tuple[bytes, str | None]:
    """Remove every `name:` field (with its folded continuation lines); return the message and the first
    value, unfolded and stripped. The body is never touched."""
    head, rest = split_headers(content)
    wanted = name.lower().encode("ascii") + b":"
    kept: list[bytes] = []
    removed: list[list[bytes]] = []
    current: list[bytes] | None = None  # the lines of the field being removed
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # RFC 5322 folding: continues the field above
            (kept if current is None else current).append(line)
        elif line.lower().startswith(wanted):
            current = [line[len(wanted) :]]
            removed.append(current)
        else:
            current = None
            kept.append(line)
    if not removed:
        return content, None
    value = b" ".join(part.strip() for part in removed[0])
    return b"".join(kept) + rest, value.decode("utf-8", "replace")
