"""Postfix as a real peer, in a private instance (own config, queue and data directories, log file)
that never touches the system's /etc/postfix or /var/spool/postfix.

- `PostfixSubmission`: smtpd requiring STARTTLS, then AUTH PLAIN / LOGIN through Cyrus SASL against a
  sasldb; accepted mail is relayed to a `RecordingSink` (from Postfix's queue, so use `sink.wait_for`).
- `PostfixRelay`: the reverse, for benchmarks: accepts anything from 127.0.0.0/8 without auth and
  relays it to one upstream over STARTTLS with AUTH (Postfix as a SASL client), e.g. to Dovecot.

Both need root: Postfix's master and its set-uid helpers insist on it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from tests.peers.certs import TLSFiles
from tests.peers.common import HOST, DaemonPeer, PeerError, free_port, log_tail
from tests.peers.sink import ReceivedMessage, RecordingSink

POSTFIX = "/usr/sbin/postfix"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
POSTFIX_BINARIES = (POSTFIX, SASLPASSWD2)
DEFAULT_USERS = {"alice": "alice-secret", "bob": "bob-secret"}
SASL_REALM = "peers.test"

# Every daemon in the instance that the tests exercise; chroot off (fifth column "n") so paths to
# certificates, the sasldb and the log need no copy inside a jail.
_MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
proxywrite unix - - n -     1 proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""
# The TLS proxy behind `smtp_tls_connection_reuse` (Debian's master.cf ships it commented out): smtp
# hands it the TCP connection, it does the TLS, and the plaintext end can then be cached in scache.
_TLSPROXY_SERVICE = "tlsproxy  unix  - - n -     0 tlsproxy\n"


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


class _PostfixInstance(DaemonPeer):
    """A private Postfix on a free 127.0.0.1 port, run by `postfix -c <dir> start-fg` as our child."""

    name = "postfix"
    title = "Postfix"

    def __init__(
        self, workdir: Path | None, tls: TLSFiles | None, port: int | None, startup_timeout: float
    ) -> None:
        super().__init__(HOST, port or free_port(), workdir, tls, startup_timeout)

    @property
    def config_dir(self) -> Path:
        return self.dir / "etc"

    @property
    def log_file(self) -> Path:
        return self.dir / "postfix.log"

    def wait_for_log_count(self, text: str, count: int, timeout: float = 20) -> list[str]:
        """Wait until `count` lines of the log contain `text` (postlogd writes a delivery's line a moment
        after the next hop has the message); return them all."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                lines = [
                    line for line in self.log_file.read_text(errors="replace").splitlines() if text in line
                ]
                if len(lines) >= count:
                    return lines
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"fewer than {count} lines with {text!r} in {self.log_file}:\n{log_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise PeerError("a private Postfix instance needs root (its master and set-gid tools insist)")
        self._prepare_workdir()
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(mode=0o755, parents=True)
        # master keeps its lock and the TLS session cache there, as the mail_owner.
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        self._prepare()
        master_cf = _MASTER_CF.format(host=self.host, port=self.port) + self._extra_services()
        (self.config_dir / "master.cf").write_text(master_cf)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        # start-fg keeps master as our descendant (no daemonizing), and fixes up queue permissions.
        self._launch([POSTFIX, "-c", str(self.config_dir), "start-fg"])

    def stop(self) -> None:
        if self._proc is not None:
            master_pid = self._master_pid()
            if self._proc.poll() is None:
                # `postfix stop` signals master through its pid file and waits for it to exit.
                subprocess.run(
                    [POSTFIX, "-c", str(self.config_dir), "stop"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
            # master calls setsid(), so it and its children (smtpd, qmgr, ...) form their own process
            # group, out of reach of stop_process_group(); make sure that group is gone too.
            if master_pid is not None:
                _wait_gone(master_pid, timeout=10)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(master_pid, signal.SIGKILL)
        super().stop()  # then the group of the `postfix start-fg` process itself

    def _master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # -- configuration, shared part then per role --------------------------------------------------

    def _prepare(self) -> None:
        """Write role-specific files (sasldb, ...) before main.cf."""

    def _role_cf(self) -> str:
        raise NotImplementedError

    def _extra_services(self) -> str:
        """master.cf lines beyond the shared ones."""
        return ""

    def _main_cf(self) -> str:
        d = self.dir
        return f"""\
# Written by tests/peers/postfix.py: a private instance, nothing from /etc/postfix but the binaries.
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file = {self.log_file}
# maillog_file must sit under one of these (Postfix's guard against logging to odd places).
maillog_file_prefixes = {d}
myhostname = {self.name}-{self.port}.localhost
mydomain = localhost
myorigin = $myhostname
inet_interfaces = {HOST}
inet_protocols = ipv4
# Nothing is delivered locally: every recipient is remote and goes to relayhost.
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 no local delivery in this test instance
alias_maps =
alias_database =
biff = no
notify_classes =
smtputf8_enable = no
# Retry quickly: a test waits seconds, not Postfix's default minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
{self._role_cf()}"""


class PostfixSubmission(_PostfixInstance):
    """smtpd with STARTTLS required and Cyrus SASL (sasldb, PLAIN LOGIN), relaying to a sink."""

    name = "postfix-submission"

    def __init__(
        self,
        workdir: Path | None = None,
        tls: TLSFiles | None = None,
        *,
        users: dict[str, str] | None = None,
        recipient_access: dict[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 30,
    ) -> None:
        super().__init__(workdir, tls, port, startup_timeout)
        self.users = dict(users or DEFAULT_USERS)
        # address -> access(5) action, e.g. "550 5.1.1 No such user": smtpd's reply to that RCPT.
        self.recipient_access = dict(recipient_access or {})
        self.sink = RecordingSink()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """What Postfix relayed to the sink so far (delivery is asynchronous: see sink.wait_for)."""
        return self.sink.messages

    def _prepare(self) -> None:
        self._stack.enter_context(self.sink)
        sasldb = self.config_dir / "sasldb2"
        for user, password in self.users.items():
            # -p: password from stdin; -c: create; -u: the realm smtpd appends (smtpd_sasl_local_domain).
            subprocess.run(
                [SASLPASSWD2, "-f", str(sasldb), "-c", "-p", "-u", SASL_REALM, user],
                input=password.encode(),
                check=True,
                capture_output=True,
            )
        sasldb.chmod(0o644)  # smtpd reads it as the postfix user
        # Postfix asks Cyrus for the application "smtpd", i.e. <cyrus_sasl_config_path>/smtpd.conf;
        # Debian's build looks in <config_directory>/sasl whatever that parameter says, so use that.
        (self.config_dir / "sasl").mkdir(mode=0o755)
        (self.config_dir / "sasl" / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
            f"sasldb_path: {sasldb}\nmech_list: PLAIN LOGIN\n"
        )

    def _role_cf(self) -> str:
        assert self.tls is not None
        return f"""\
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {self.tls.cert_file}
smtpd_tls_key_file = {self.tls.key_file}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {self.config_dir}/sasl
smtpd_sasl_local_domain = {SASL_REALM}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
mynetworks = {HOST}/32
relayhost = [{self.sink.host}]:{self.sink.port}
smtp_tls_security_level = none
{self._recipient_restrictions()}"""

    def _recipient_restrictions(self) -> str:
        if not self.recipient_access:
            return ""
        # An inline: table (Postfix 3.0), braces around each entry since the actions hold spaces.
        entries = " ".join(f"{{ {address} = {action} }}" for address, action in self.recipient_access.items())
        return f"smtpd_recipient_restrictions = check_recipient_access inline:{{ {entries} }}\n"


class PostfixRelay(_PostfixInstance):
    """Postfix as a SASL client: accepts mail from 127.0.0.0/8 without auth or TLS, and relays it to
    `upstream_host:upstream_port` with STARTTLS (CA-verified chain) and AUTH as `user`.

    A reference point for benchmarks: the same job as outbound-relay, done by Postfix. By default every
    delivery opens its own connection, with a TLS handshake and AUTH: Postfix caches plaintext SMTP
    connections but not TLS ones. `tls_connection_reuse=True` sets `smtp_tls_connection_reuse = yes` and
    adds the tlsproxy(8) service, so that TLS connections are cached too (Postfix 3.4 and later) while
    the relayhost has a backlog in the active queue (`smtp_connection_cache_on_demand`, default yes)."""

    name = "postfix-relay"

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        user: str,
        password: str,
        workdir: Path | None = None,
        tls: TLSFiles | None = None,
        *,
        mechanism: str = "PLAIN",
        tls_connection_reuse: bool = False,
        port: int | None = None,
        startup_timeout: float = 30,
    ) -> None:
        super().__init__(workdir, tls, port, startup_timeout)
        self.upstream = (upstream_host, upstream_port)
        self.tls_connection_reuse = tls_connection_reuse
        self._user = user
        self._password = password
        self._mechanism = mechanism.lower()

    def _role_cf(self) -> str:
        assert self.tls is not None
        host, port = self.upstream
        return f"""\
smtpd_tls_security_level = none
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [{host}]:{port}
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {self.tls.ca_file}
smtp_sasl_auth_enable = yes
smtp_sasl_type = cyrus
# A static map answers every lookup with "user:password", so no postmap'd file is needed.
smtp_sasl_password_maps = static:{self._user}:{self._password}
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_sasl_mechanism_filter = {self._mechanism}
smtp_tls_connection_reuse = {"yes" if self.tls_connection_reuse else "no"}
"""

    def _extra_services(self) -> str:
        return _TLSPROXY_SERVICE if self.tls_connection_reuse else ""
