"""swaks (Debian's `swaks` package), a real SMTP client, run against the relay: the replies it saw."""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass

import pytest

# A server line of swaks' transcript: "<-  250 OK" (accepted), "<** 553 ..." (refused), "<~  250" over TLS.
_SERVER_LINE = re.compile(r"^<[-~*]+\s+(\d{3})[ -](.*)$")


@dataclass(frozen=True)
class SwaksRun:
    exit_code: int
    transcript: str

    @property
    def replies(self) -> list[tuple[int, str]]:
        """Every server reply line, in order: (code, text)."""
        found = (_SERVER_LINE.match(line) for line in self.transcript.splitlines())
        return [(int(m[1]), m[2]) for m in found if m]

    def reply_to(self, command: str) -> tuple[int, str]:
        """The first reply line after the client line that starts with `command` ("RCPT", "AUTH")."""
        lines = self.transcript.splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"^ ?[-~*]*>\s+{command}", line):
                for after in lines[i + 1 :]:
                    match = _SERVER_LINE.match(after)
                    if match:
                        return int(match[1]), match[2]
        raise AssertionError(f"swaks sent no {command}:\n{self.transcript}")


async def swaks(port: int, *args: str, timeout: float = 60) -> SwaksRun:
    """`swaks --server 127.0.0.1:port ARGS`, without blocking the loop the relay runs in."""
    binary = shutil.which("swaks")
    if binary is None:
        pytest.skip("swaks is not installed (hack/setup installs it)")
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "app.test",
        "--from",
        "app@example.org",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return SwaksRun(proc.returncode, out.decode("utf-8", "replace"))
