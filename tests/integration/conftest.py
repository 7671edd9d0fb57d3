"""Session-scoped real SMTP peers (Dovecot submission, Postfix + Cyrus SASL) on 127.0.0.1.

The fixtures skip when the Debian packages are missing on a developer machine; in CI (CI=true) a
missing peer is a failure, so the suite can't go green by silently testing nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/peers is imported as `tests.peers` (also by benchmarks); the pytest entry point does not put
# the repository root on sys.path by itself.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.peers import (  # noqa: E402
    DovecotSubmission,
    PostfixSubmission,
    TLSFiles,
    make_tls_files,
    peer_binaries_missing,
    shared_workdir,
)
from tests.peers.dovecot import DOVECOT  # noqa: E402
from tests.peers.postfix import POSTFIX_BINARIES  # noqa: E402


def require_binaries(what: str, *binaries: str) -> None:
    missing = peer_binaries_missing(*binaries)
    if not missing:
        return
    message = f"{what} not installed (missing {', '.join(missing)}); run hack/setup"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def peer_workdir() -> Iterator[Path]:
    """One directory for the run's peers, readable by the daemons' users (not pytest's 0700 tmp)."""
    with shared_workdir() as path:
        yield path


@pytest.fixture(scope="session")
def ca(peer_workdir: Path) -> TLSFiles:
    """The CA (ca_file) that signed every peer's certificate for 127.0.0.1 / localhost."""
    return make_tls_files(peer_workdir / "tls")


@pytest.fixture(scope="session")
def dovecot(peer_workdir: Path, ca: TLSFiles) -> Iterator[DovecotSubmission]:
    require_binaries("Dovecot submission (dovecot-core, dovecot-submissiond)", DOVECOT)
    with DovecotSubmission(peer_workdir, ca) as peer:
        yield peer


@pytest.fixture(scope="session")
def postfix(peer_workdir: Path, ca: TLSFiles) -> Iterator[PostfixSubmission]:
    require_binaries("Postfix with Cyrus SASL (postfix, sasl2-bin)", *POSTFIX_BINARIES)
    with PostfixSubmission(peer_workdir, ca) as peer:
        yield peer
