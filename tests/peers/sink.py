"""The final hop: an aiosmtpd server that accepts anything and records it, so a test can count
what really arrived behind a peer, not just the peer's 250."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller

from tests.peers.common import HOST, free_port


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self.changed = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = ReceivedMessage(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.content))
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()
        return "250 Ok: recorded"


class RecordingSink:
    """aiosmtpd on 127.0.0.1 in a background thread, no TLS, no AUTH; use as a context manager."""

    def __init__(self, port: int | None = None) -> None:
        self.host = HOST
        self.port = port or free_port()
        self._recorder = _Recorder()
        self._controller = Controller(self._recorder, hostname=HOST, port=self.port)

    def __enter__(self) -> RecordingSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of everything received so far, oldest first."""
        with self._recorder.changed:
            return list(self._recorder.messages)

    def clear(self) -> None:
        with self._recorder.changed:
            self._recorder.messages.clear()

    def messages_to(self, rcpt: str) -> list[ReceivedMessage]:
        """What arrived for one recipient: session-scoped peers are shared, so a test that sends to
        its own unique address can count its messages regardless of what other tests sent."""
        return [m for m in self.messages if rcpt in m.rcpt_tos]

    def wait_for(self, count: int, rcpt: str | None = None, timeout: float = 10) -> list[ReceivedMessage]:
        """Block until at least `count` messages (for `rcpt`, if given) arrived, and return them.

        Postfix delivers from its queue after its 250, so counting right away would race."""
        deadline = time.monotonic() + timeout
        with self._recorder.changed:
            while True:
                got = [m for m in self._recorder.messages if rcpt is None or rcpt in m.rcpt_tos]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink on port {self.port} got {len(got)} of {count} messages")
                self._recorder.changed.wait(left)

    async def wait_for_async(
        self, count: int, rcpt: str | None = None, timeout: float = 10
    ) -> list[ReceivedMessage]:
        """`wait_for` for async tests: waits in a thread, so a relay on the test's own event loop
        keeps running meanwhile."""
        return await asyncio.to_thread(self.wait_for, count, rcpt, timeout)
