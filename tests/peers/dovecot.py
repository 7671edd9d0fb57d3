"""Dovecot's submission service (Debian dovecot-submissiond) as a real upstream: STARTTLS required,
then AUTH PLAIN / LOGIN against a passwd-file, or XOAUTH2 against the `oauth2` passdb, which validates
HS256 JWTs locally or, given `oauth2_introspection_url`, asks an authorization server about each token
(RFC 7662 introspection, e.g. Ory Hydra's, see hydra.py). Accepted mail is relayed to a `RecordingSink`.

    with DovecotSubmission() as dovecot:
        ... aiosmtplib.SMTP(hostname=dovecot.host, port=dovecot.port, ...) ...
        token = dovecot.make_token("alice")
        assert len(dovecot.sink.wait_for(1)) == 1
"""

from __future__ import annotations

import base64
import grp
import os
import pwd
import secrets
import time
from pathlib import Path

import jwt

from tests.peers.certs import TLSFiles
from tests.peers.common import DaemonPeer, PeerError, free_port, log_tail
from tests.peers.sink import ReceivedMessage, RecordingSink

DOVECOT = "/usr/sbin/dovecot"
DEFAULT_USERS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
DH_PARAMS = Path("/usr/share/dovecot/dh.pem")
# Dovecot counts a connection whose remote IP equals its local IP as "secured", like TLS, and then
# allows AUTH without STARTTLS: a listener on 127.0.0.1 reached from 127.0.0.1 would never prove that
# the client did STARTTLS. On 127.0.0.2 (still loopback), clients arrive from 127.0.0.1 by default.
DOVECOT_HOST = "127.0.0.2"


class DovecotSubmission(DaemonPeer):
    """One private Dovecot instance (own base_dir, state, logs) on a free port of 127.0.0.2."""

    name = "dovecot"
    title = "Dovecot"

    def __init__(
        self,
        workdir: Path | None = None,
        tls: TLSFiles | None = None,
        *,
        users: dict[str, str] | None = None,
        port: int | None = None,
        max_userip_connections: int = 100,
        auth_failure_delay: str = "0",
        startup_timeout: float = 20,
        relay_to: tuple[str, int] | None = None,
        oauth2_introspection_url: str | None = None,
    ) -> None:
        """`relay_to` (host, port): where submission relays accepted mail instead of to a
        `RecordingSink` of its own, e.g. Postfix's smtp-sink in benchmarks; `sink` is then unavailable.
        `oauth2_introspection_url`: XOAUTH2 tokens are valid when this endpoint calls them active (and
        their `sub` is the user), instead of when they carry `make_token`'s signature."""
        super().__init__(DOVECOT_HOST, port or free_port(DOVECOT_HOST), workdir, tls, startup_timeout)
        self.users = dict(users or DEFAULT_USERS)
        # Real Dovecot sleeps 2 s before a failed AUTH reply; tests of failures don't need to wait.
        self._auth_failure_delay = auth_failure_delay
        self._max_userip_connections = max_userip_connections
        self._hs256_key = secrets.token_bytes(32)
        self._introspection_url = oauth2_introspection_url
        self._sink = RecordingSink() if relay_to is None else None
        self.relay_to: tuple[str, int] = relay_to or (self.sink.host, self.sink.port)

    # -- what tests use -------------------------------------------------------------------------

    @property
    def sink(self) -> RecordingSink:
        """Where Dovecot relays accepted mail (unless started with `relay_to`)."""
        if self._sink is None:
            host, port = self.relay_to
            raise PeerError(f"this Dovecot relays to {host}:{port}, not to a RecordingSink")
        return self._sink

    @property
    def messages(self) -> list[ReceivedMessage]:
        """What Dovecot relayed to the sink so far."""
        return self.sink.messages

    @property
    def log_file(self) -> Path:
        return self.dir / "dovecot.log"

    def wait_for_log(self, text: str, timeout: float = 20) -> str:
        """Wait until a line containing `text` is in Dovecot's log (auth verdicts, logins); return it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_file.read_text(errors="replace").splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in {self.log_file}:\n{log_tail(self.log_file)}")
            time.sleep(0.05)

    def make_token(
        self, user: str, *, expired: bool = False, key: bytes | None = None, lifetime: int = 3600
    ) -> str:
        """A bearer token Dovecot accepts for `user` (its `sub`); `expired` or a foreign `key` make one
        it must refuse."""
        now = int(time.time())
        exp = now - 60 if expired else now + lifetime
        iat = exp - lifetime if expired else now
        claims = {"sub": user, "iat": iat, "nbf": iat, "exp": exp}
        return jwt.encode(claims, key or self._hs256_key, algorithm="HS256")

    # -- lifecycle (the rest is DaemonPeer's) ----------------------------------------------------

    def _start(self) -> None:
        self._prepare_workdir()
        self.dir.mkdir(mode=0o755, parents=True)
        if self._sink is not None:
            self._stack.enter_context(self._sink)
        conf = self._write_config()
        # -F: stay in the foreground, so this Popen is the master and stop() can end it.
        self._launch([DOVECOT, "-F", "-c", str(conf)])

    # -- configuration --------------------------------------------------------------------------

    def _write_config(self) -> Path:
        assert self.tls is not None
        d = self.dir
        for sub in ("run", "state"):
            (d / sub).mkdir(mode=0o755)
        # Dovecot itself needs its internal users; as non-root it can only be the current user.
        if os.geteuid() == 0:
            internal_user, internal_group, login_user = "dovecot", "dovecot", "dovenull"
        else:
            internal_user = login_user = pwd.getpwuid(os.geteuid()).pw_name
            internal_group = grp.getgrgid(os.getegid()).gr_name
        internal = pwd.getpwnam(internal_user)
        mail_uid, mail_gid = internal.pw_uid, internal.pw_gid
        # Submission opens the user's mail storage (for BURL) even though nothing is stored there.
        (d / "mail").mkdir(mode=0o755)
        os.chown(d / "mail", mail_uid, mail_gid)

        (d / "users").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        # The oauth2 passdb's local validation looks keys up as <azp>/<alg>/<kid>; tokens without
        # azp / kid use "default". The file holds the HMAC key base64-encoded.
        key_file = d / "keys" / "default" / "HS256" / "default"
        key_file.parent.mkdir(mode=0o755, parents=True)
        key_file.write_text(base64.b64encode(self._hs256_key).decode())
        if self._introspection_url is None:
            validation = (
                f"introspection_mode = local\nlocal_validation_key_dict = fs:posix:prefix={d}/keys/\n"
            )
        else:
            # RFC 7662: POST token=...; the answer's "active" must be true. Asked at every AUTH (Dovecot's
            # auth cache is off), so a token revoked at the server is refused at once.
            validation = (
                f"introspection_mode = post\nintrospection_url = {self._introspection_url}\n"
                "active_attribute = active\nactive_value = true\n"
            )
        (d / "oauth2.conf").write_text(validation + "username_attribute = sub\n")
        for path in (d / "users", key_file, d / "oauth2.conf"):
            path.chmod(0o644)  # read by the auth process as the dovecot user

        dh = f"ssl_dh = <{DH_PARAMS}\n" if DH_PARAMS.exists() else ""
        conf = d / "dovecot.conf"
        conf.write_text(f"""\
# Written by tests/peers/dovecot.py: a self-contained instance, nothing from /etc/dovecot.
instance_name = outbound-relay-test-{self.port}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
protocols = submission
listen = {self.host}
hostname = localhost

ssl = required
ssl_cert = <{self.tls.cert_file}
ssl_key = <{self.tls.key_file}
{dh}disable_plaintext_auth = yes
auth_mechanisms = plain login xoauth2
auth_failure_delay = {self._auth_failure_delay}
auth_verbose = yes
# The relay pools connections per user; Dovecot's default cap of 10 per user+IP would bite.
mail_max_userip_connections = {self._max_userip_connections}
# The static userdb below runs sessions as a system user, below the default floor of 500.
first_valid_uid = {mail_uid}

passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN {d}/users
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={d}/mail/%u
}}
mail_location = maildir:~/Maildir

# chroot off: a non-root Dovecot cannot chroot, and a test instance gains nothing from it.
# Failed logins would otherwise make anvil delay every later AUTH from 127.0.0.1, up to 15 s.
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

submission_relay_host = {self.relay_to[0]}
submission_relay_port = {self.relay_to[1]}
submission_relay_ssl = no
service submission-login {{
  chroot =
  inet_listener submission {{
    address = {self.host}
    port = {self.port}
  }}
}}
""")
        conf.chmod(0o644)
        return conf
