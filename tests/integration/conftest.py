"""Session-scoped real SMTP peers (Dovecot submission, Postfix + Cyrus SASL) on loopback.

The fixtures skip when the Debian packages are missing on a developer machine; in CI (CI=true) a
missing peer is a failure, so the suite can't go green by silently testing nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    DovecotSubmission,
    PostfixSubmission,
    TLSFiles,
    make_tls_files,
    require_binaries,
    shared_workdir,
)
from tests.peers.dovecot import DOVECOT
from tests.peers.hydra import Hydra
from tests.peers.postfix import POSTFIX_BINARIES

# Access tokens of the short-lived Hydra live this long (seconds): tests send mail across several.
SHORT_TTL = 4


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


def require_go() -> None:
    """Hydra is built from its Go module on first use (hack/control-plane path hydra)."""
    from tests.cluster.controlplane import go_missing

    reason = go_missing()
    if reason is not None:
        require_binaries(f"Go, to build Ory Hydra ({reason})", "go")


@pytest.fixture(scope="session")
def hydra(peer_workdir: Path, ca: TLSFiles) -> Iterator[Hydra]:
    """Ory Hydra issuing RS256 JWT access tokens that live SHORT_TTL seconds."""
    require_go()
    with Hydra(peer_workdir, ca, access_token_ttl=SHORT_TTL) as peer:
        yield peer


@pytest.fixture(scope="session")
def hydra_long(peer_workdir: Path, ca: TLSFiles) -> Iterator[Hydra]:
    """Ory Hydra whose access tokens outlive any test: for revocation, where expiry must not interfere."""
    require_go()
    with Hydra(peer_workdir, ca, access_token_ttl=600) as peer:
        yield peer


@pytest.fixture(scope="session")
def dovecot_hydra(peer_workdir: Path, ca: TLSFiles, hydra: Hydra) -> Iterator[DovecotSubmission]:
    """Dovecot accepting XOAUTH2 tokens that `hydra` calls active (RFC 7662 introspection)."""
    require_binaries("Dovecot submission (dovecot-core, dovecot-submissiond)", DOVECOT)
    with DovecotSubmission(peer_workdir, ca, oauth2_introspection_url=hydra.introspection_url) as peer:
        yield peer


@pytest.fixture(scope="session")
def dovecot_hydra_long(peer_workdir: Path, ca: TLSFiles, hydra_long: Hydra) -> Iterator[DovecotSubmission]:
    require_binaries("Dovecot submission (dovecot-core, dovecot-submissiond)", DOVECOT)
    with DovecotSubmission(peer_workdir, ca, oauth2_introspection_url=hydra_long.introspection_url) as peer:
        yield peer
