"""A pool drained by its idle timeout gives the C heap's free pages back (pool.release_free_memory)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from outbound_relay import pool
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream


def test_release_free_memory_runs_here() -> None:
    pool.release_free_memory()  # glibc: trims; elsewhere: only collects


async def test_drained_pool_releases_memory_once(
    tls: TLSFiles, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases: list[int] = []
    monkeypatch.setattr(pool, "release_free_memory", lambda: releases.append(1))
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        write_config(
            config_path,
            {"upstream": {"idleTimeoutSeconds": 0.1}, "policies": [catch_all_policy(up.port, tls)]},
        )
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@example.com"], message())).code == 250
            assert releases == []  # not while a connection is open
            async with asyncio.timeout(5):
                while not releases:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # more reaper rounds with nothing left to close
    assert releases == [1]
