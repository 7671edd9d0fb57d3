from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.certs import TLSFiles, make_tls_files


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and a certificate for 127.0.0.1 / localhost, for in-process upstreams."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "relay.yaml"
