"""What the app asks of delivery status notifications: the DSN parameters of RFC 3461, RET and ENVID on
MAIL FROM, NOTIFY and ORCPT on RCPT TO. The relay offers DSN to the app; it passes the parameters on to
an upstream that offers DSN too, and honours them itself where it reports on its own (dsn.py,
docs/delivery.md "DSN parameters")."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAIL_KEYWORDS = frozenset({"RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
KEYWORDS = MAIL_KEYWORDS | RCPT_KEYWORDS
NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")

# RFC 3461 4: xtext is printable US-ASCII but "+" and "=", which is written "+" and two upper-case hex
# digits (and so is any other octet).
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-F]{2})")
# RFC 3461 4.2: addr-type is an atom (RFC 5322), the address type ("rfc822", "utf-8" of RFC 6533).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2: what the parameter may add to a RCPT line
# What the DSN parameters may add to a command line (RFC 3461 5: a server offering DSN takes longer
# lines): ENVID and RET on MAIL, ORCPT and NOTIFY on RCPT, each with a space and its keyword.
MAIL_LINE_EXTRA = len(" ENVID=") + MAX_ENVID + len(" RET=HDRS")
RCPT_LINE_EXTRA = len(" ORCPT=") + MAX_ORCPT + len(" NOTIFY=SUCCESS,FAILURE,DELAY")


class DsnSyntaxError(ValueError):
    """A DSN parameter the app gave is malformed, repeated or on the wrong command; the text names it."""


def is_dsn_param(word: str) -> bool:
    """Whether a word of a MAIL or RCPT line is a DSN parameter (`KEYWORD=...`, keyword in any case)."""
    return word.partition("=")[0].upper() in KEYWORDS


def xtext_decode(text: str) -> str:
    return _XTEXT_ESCAPE.sub(lambda match: chr(int(match[1], 16)), text)


def _parse(options: Iterable[str], allowed: frozenset[str], command: str) -> dict[str, str]:
    """The DSN parameters among `options` (other parameters are left alone), by upper-case keyword."""
    found: dict[str, str] = {}
    for option in options:
        keyword, eq, value = option.partition("=")
        keyword = keyword.upper()
        if keyword not in KEYWORDS:
            continue
        if keyword not in allowed:
            other = "RCPT TO" if command == "MAIL FROM" else "MAIL FROM"
            raise DsnSyntaxError(f"{keyword} is a parameter of {other}, not of {command} (RFC 3461)")
        if keyword in found:
            raise DsnSyntaxError(f"{keyword} is given twice")
        if not eq or not value:
            raise DsnSyntaxError(f"{keyword} needs a value")
        found[keyword] = value
    return found


def _xtext(keyword: str, value: str, limit: int) -> str:
    """`value`, checked: xtext, and decoding to printable US-ASCII (RFC 3461 4.2, 4.4: what a DSN shows
    as Original-Envelope-Id or Original-Recipient; Postfix refuses anything else)."""
    if len(value) > limit:
        raise DsnSyntaxError(f"{keyword} is longer than {limit} characters")
    if _XTEXT.match(value) is None:
        raise DsnSyntaxError(
            f"{keyword} is not xtext (RFC 3461 4: printable US-ASCII, with '+', '=' and other octets "
            "written '+' and two upper-case hex digits)"
        )
    if _PRINTABLE.match(xtext_decode(value)) is None:
        raise DsnSyntaxError(f"{keyword} decodes to characters other than printable US-ASCII")
    return value


@dataclass(frozen=True, slots=True)
class MailDsn:
    """RET and ENVID of a MAIL FROM (RFC 3461 4.3, 4.4)."""

    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # xtext, as the app gave it

    @classmethod
    def from_options(cls, options: Iterable[str]) -> MailDsn:
        """Raises DsnSyntaxError naming the parameter that is wrong."""
        found = _parse(options, MAIL_KEYWORDS, "MAIL FROM")
        ret = found.get("RET")
        if ret is not None:
            ret = ret.upper()
            if ret not in ("FULL", "HDRS"):
                raise DsnSyntaxError("RET must be FULL or HDRS")
        envid = found.get("ENVID")
        return cls(ret, None if envid is None else _xtext("ENVID", envid, MAX_ENVID))

    def params(self) -> bytes:
        """` RET=... ENVID=...` for the upstream's MAIL FROM line; empty when none was given."""
        return (b" RET=" + self.ret.encode() if self.ret else b"") + (
            b" ENVID=" + self.envid.encode() if self.envid else b""
        )

    @property
    def envelope_id(self) -> str | None:
        """The ENVID as a DSN's Original-Envelope-Id shows it (RFC 3464 2.2.1): decoded, which from_options
        made sure is printable US-ASCII."""
        return None if self.envid is None else xtext_decode(self.envid)


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """NOTIFY and ORCPT of a RCPT TO (RFC 3461 4.1, 4.2)."""

    notify: tuple[str, ...] | None = None  # ("NEVER",) or some of NOTIFY_EVENTS, in the app's order
    orcpt: str | None = None  # "addr-type;xtext", as the app gave it

    @classmethod
    def from_options(cls, options: Iterable[str]) -> RcptDsn:
        """Raises DsnSyntaxError naming the parameter that is wrong."""
        found = _parse(options, RCPT_KEYWORDS, "RCPT TO")
        notify: tuple[str, ...] | None = None
        if (given := found.get("NOTIFY")) is not None:
            notify = tuple(word.upper() for word in given.split(","))
            if notify != ("NEVER",):
                if not all(event in NOTIFY_EVENTS for event in notify):
                    raise DsnSyntaxError(
                        "NOTIFY must be NEVER, or a comma-separated list of SUCCESS, FAILURE and DELAY"
                    )
                if len(set(notify)) != len(notify):
                    raise DsnSyntaxError("NOTIFY names an event twice")
        orcpt = found.get("ORCPT")
        if orcpt is not None:
            addr_type, semicolon, address = orcpt.partition(";")
            if not semicolon or _ADDR_TYPE.match(addr_type) is None or not address:
                raise DsnSyntaxError(
                    "ORCPT must be an address type, ';' and the address: rfc822;user@example.com"
                )
            _xtext("ORCPT", orcpt, MAX_ORCPT)
        return cls(notify, orcpt)

    def params(self) -> bytes:
        """` NOTIFY=... ORCPT=...` for the upstream's RCPT TO line; empty when none was given."""
        return (b" NOTIFY=" + ",".join(self.notify).encode() if self.notify else b"") + (
            b" ORCPT=" + self.orcpt.encode() if self.orcpt else b""
        )

    def wants(self, event: str) -> bool:
        """Whether the sender asked for a DSN on this event (SUCCESS, FAILURE or DELAY); without NOTIFY,
        on failure only (RFC 3461 4.1 leaves FAILURE or FAILURE,DELAY to the MTA; the relay never delays)."""
        if self.notify is None:
            return event == "FAILURE"
        return event in self.notify

    @property
    def original_recipient(self) -> str | None:
        """ORCPT as a DSN's Original-Recipient shows it (RFC 3464 2.3.1): type, ';' and the address,
        decoded (printable US-ASCII, from_options made sure)."""
        if self.orcpt is None:
            return None
        addr_type, _, address = self.orcpt.partition(";")
        return f"{addr_type};{xtext_decode(address)}"


NO_MAIL_DSN = MailDsn()
NO_RCPT_DSN = RcptDsn()
