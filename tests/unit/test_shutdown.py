"""Graceful shutdown with sessions in every state aiosmtpd can leave them in."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib

from tests.peers.certs import TLSFiles
from tests.support.relay import running_relay, write_config


async def test_abandoned_transaction_does_not_hold_up_shutdown(tls: TLSFiles, config_path: Path) -> None:
    write_config(config_path, {})
    async with running_relay(config_path) as relay:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False)
        await client.connect()
        await client.mail("app@example.org")
        await client.ehlo()  # RFC 5321 4.1.4: EHLO ends the transaction; aiosmtpd tells no handler
        assert relay.open_transactions() == 0
        started = time.monotonic()
        await relay.stop(grace_seconds=5)
        assert time.monotonic() - started < 2
        client.close()


async def test_open_transaction_is_waited_for_and_new_ones_refused(tls: TLSFiles, config_path: Path) -> None:
    write_config(config_path, {})
    async with running_relay(config_path) as relay:
        busy = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False)
        idle = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False)
        await busy.connect()
        await idle.connect()
        await idle.ehlo()
        await busy.mail("")  # a bounce: the null sender is a transaction too
        assert relay.open_transactions() == 1
        stopping = asyncio.create_task(relay.stop(grace_seconds=0.5))
        await asyncio.sleep(0.1)
        refused = await idle.execute_command(b"MAIL", b"FROM:<app@example.org>")
        assert refused.code == 421
        assert not stopping.done()  # still waiting for `busy`
        await stopping
        busy.close()
        idle.close()
