"""Real upstream SMTP peers for integration tests and benchmarks, all on loopback (127.0.0.1; Dovecot
on 127.0.0.2, see dovecot.py).

- `DovecotSubmission`: Dovecot's submission service, STARTTLS required, AUTH PLAIN / LOGIN / XOAUTH2
  (XOAUTH2 through the `oauth2` passdb validating JWTs locally; mint them with `make_token`).
- `PostfixSubmission`: Postfix with Cyrus SASL (sasldb), STARTTLS required, AUTH PLAIN / LOGIN.
- `PostfixRelay`: Postfix as a SASL *client*, relaying everything to one authenticated upstream.
- `RecordingSink`: the aiosmtpd server the submission peers relay to; it records what arrived.
- `make_tls_files`: a trustme CA and a server certificate for 127.0.0.1, 127.0.0.2 and localhost.
"""

from tests.peers.certs import TLSFiles, make_tls_files
from tests.peers.common import PeerError, peer_binaries_missing, require_binaries, shared_workdir
from tests.peers.dovecot import DovecotSubmission
from tests.peers.postfix import PostfixRelay, PostfixSubmission
from tests.peers.sink import ReceivedMessage, RecordingSink

__all__ = [
    "DovecotSubmission",
    "PeerError",
    "PostfixRelay",
    "PostfixSubmission",
    "ReceivedMessage",
    "RecordingSink",
    "TLSFiles",
    "make_tls_files",
    "peer_binaries_missing",
    "require_binaries",
    "shared_workdir",
]
