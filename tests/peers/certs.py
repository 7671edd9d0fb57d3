"""A throwaway CA and a server certificate for 127.0.0.1, 127.0.0.2 and localhost, written to files.

The peers are daemons that read their key material from disk, some of them (Dovecot's auth process,
Postfix's smtpd) after dropping privileges, so the files and every directory above them must be
readable by other users: create `directory` with `shared_workdir()`, not `mktemp -d` (mode 0700).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

# 127.0.0.2: Dovecot listens there (see dovecot.py), so its certificate must name it too.
SERVER_NAMES = ("127.0.0.1", "127.0.0.2", "localhost")


@dataclass(frozen=True)
class TLSFiles:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA (hostname checked: use 127.0.0.1 or localhost)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls_files(directory: Path) -> TLSFiles:
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*SERVER_NAMES)
    files = TLSFiles(ca, directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_file))
    # Leaf first, then the chain: what Dovecot's ssl_cert and Postfix's smtpd_tls_cert_file expect.
    files.cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(files.key_file))
    for path in (files.ca_file, files.cert_file, files.key_file):
        # A test key: readable by the daemons' unprivileged users is the point.
        path.chmod(0o644)
    return files
