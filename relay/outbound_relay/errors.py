"""Failures as the SMTP client sees them: a reply code, an enhanced status code and a text.

A 4xx tells the app to keep the message and retry, a 5xx to give up on it; we answer 4xx whenever the
fault is ours or the upstream's to fix (unreachable, TLS, credentials, config), so nothing is lost.
Reply texts never carry passwords or tokens.
"""

from __future__ import annotations

from outbound_relay.reply import Reply


class RelayError(Exception):
    """A transaction ends with this reply to the client."""

    def __init__(self, code: int, status: str, text: str) -> None:
        self.reply = Reply.of(code, status, text)
        super().__init__(self.reply.one_line())  # what logs show: one line, printable, like the reply

    @property
    def temporary(self) -> bool:
        return not self.reply.is_permanent


class UpstreamUnavailable(RelayError, ConnectionError):
    """Could not reach or keep a session with the upstream (connect, TLS, timeout, lost connection)."""

    def __init__(self, text: str) -> None:
        super().__init__(451, "4.4.1", text)


class DeliveryUncertain(UpstreamUnavailable):
    """The session failed after the message itself was sent, before the upstream's verdict on it: the
    recipients may have it."""


class UpstreamAuthFailed(RelayError):
    """The upstream refused our credentials, or AUTH could not be done safely."""

    def __init__(self, text: str) -> None:
        super().__init__(454, "4.7.0", text)


class RouteMisconfigured(RelayError):
    """The settings resolved for a message cannot be used (incomplete policy, no gateway)."""

    def __init__(self, text: str) -> None:
        super().__init__(451, "4.3.5", text)


class HookFailed(RelayError):
    """A per-message hook raised or ran past its deadline."""

    def __init__(self, text: str) -> None:
        super().__init__(451, "4.3.0", text)
