"""A kubelet stand-in: projects a Secret into a directory the way the kubelet's AtomicWriter does.

    <dir>/..2026_11_25_00_40_38.000000001/relay.yaml    the keys of one version of the Secret
    <dir>/..data -> ..2026_11_25_00_40_38.000000001     swapped atomically (rename over) on each change
    <dir>/relay.yaml -> ..data/relay.yaml               one symlink per key, made once

A reader that opens `<dir>/relay.yaml` sees either the old or the new version, never a mix; the relay
polls the files and so sees the swap (inotify on the file itself would not).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client

_versions = itertools.count(1)


def project(directory: Path, data: Mapping[str, bytes]) -> None:
    """Write one version of the keys and switch `..data` to it, as the kubelet does on a change."""
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    version = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{next(_versions):09d}"
    (directory / version).mkdir()
    for key, value in data.items():
        (directory / version / key).write_bytes(value)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(version)
    os.replace(tmp_link, data_link)  # the atomic step
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")
    for entry in directory.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
            entry.unlink()  # a key that is gone
    if old is not None:
        shutil.rmtree(directory / old)


@contextlib.asynccontextmanager
async def projected_secret(
    api: client.ApiClient, namespace: str, name: str, directory: Path, *, period: float = 0.1
) -> AsyncIterator[Path]:
    """Keep `directory` in step with the Secret (polled every `period`; the real kubelet syncs about
    once a minute). Yields once the first version is projected."""
    core = client.CoreV1Api(api)

    def read() -> tuple[str, dict[str, bytes]] | None:
        try:
            read_secret: Callable[..., Any] = core.read_namespaced_secret  # the raw response, not a model
            response = read_secret(name, namespace, _preload_content=False)
        except client.exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise
        secret = json.loads(response.data)
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        return str(secret["metadata"]["resourceVersion"]), data

    projected: list[str] = []

    async def sync_once() -> None:
        found = await asyncio.to_thread(read)
        if found is not None and (not projected or found[0] != projected[-1]):
            await asyncio.to_thread(project, directory, found[1])
            projected.append(found[0])

    async def sync() -> None:
        while True:
            await sync_once()
            await asyncio.sleep(period)

    async with asyncio.timeout(30):
        while not projected:
            await sync_once()
            await asyncio.sleep(period)
    task = asyncio.create_task(sync(), name=f"kubelet {namespace}/{name}")
    try:
        yield directory
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
