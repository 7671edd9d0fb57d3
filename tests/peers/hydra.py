"""Ory Hydra as a real OAuth2 authorization server: built from its Go module by `hack/control-plane path
hydra` (cached like the control plane's binaries), run with an in-memory database on loopback, issuing
RS256 JWT access tokens that live a few seconds. The public endpoints (token, authorize) speak HTTPS with
the test CA; the admin endpoints (clients, login/consent, introspection) plain HTTP on 127.0.0.1.

    with Hydra(workdir, tls, access_token_ttl=4) as hydra:
        client = hydra.create_client()                       # client_credentials
        ... relay.yaml: oauth2: {tokenUrl: hydra.token_url, clientId: client.id, ...}
        refresh = hydra.refresh_token_for(hydra.create_client(user_flow=True), subject="alice")
"""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2 as httpx

from tests.peers.certs import TLSFiles
from tests.peers.common import HOST, DaemonPeer, PeerError, free_port, log_tail

REPO = Path(__file__).resolve().parents[2]
CONTROL_PLANE = REPO / "hack" / "control-plane"
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never visited: the code is read from the redirect itself


def hydra_binary() -> Path:
    """$HYDRA if set (a Hydra v2 built elsewhere), else the cached build; the first call on a machine
    builds it (minutes, cold; see docs/oauth2.md)."""
    if os.environ.get("HYDRA"):
        return Path(os.environ["HYDRA"])
    proc = subprocess.run(
        [str(CONTROL_PLANE), "path", "hydra"], stdout=subprocess.PIPE, text=True, check=False, timeout=3600
    )
    if proc.returncode != 0:
        raise PeerError(f"hack/control-plane path hydra failed with {proc.returncode}")
    return Path(proc.stdout.strip())


@dataclass(frozen=True)
class Client:
    id: str
    secret: str


class Hydra(DaemonPeer):
    """One private Hydra (`serve all --dev`, DSN=memory) on free ports of 127.0.0.1: `port` is the public
    (HTTPS) one."""

    name = "hydra"
    title = "Hydra"

    def __init__(
        self,
        workdir: Path | None = None,
        tls: TLSFiles | None = None,
        *,
        access_token_ttl: int = 4,
        startup_timeout: float = 120,
    ) -> None:
        super().__init__(HOST, free_port(), workdir, tls, startup_timeout)
        self.access_token_ttl = access_token_ttl
        self.admin_port = free_port()

    # -- what tests use -------------------------------------------------------------------------

    @property
    def public_port(self) -> int:
        return self.port

    @property
    def public_url(self) -> str:
        return f"https://{HOST}:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def token_url(self) -> str:
        return f"{self.public_url}/oauth2/token"

    @property
    def introspection_url(self) -> str:
        """RFC 7662 introspection, as Dovecot's oauth2 passdb asks it (`introspection_mode = post`)."""
        return f"{self.admin_url}/admin/oauth2/introspect"

    @property
    def log_file(self) -> Path:
        return self.stderr_file  # Hydra logs (JSON) to stdout

    def create_client(self, *, user_flow: bool = False, scopes: tuple[str, ...] = ("smtp",)) -> Client:
        """A confidential client: client_credentials, or (`user_flow`) authorization_code with
        refresh tokens (scope offline_access), as a mail app's delegated access works."""
        grants = ["authorization_code", "refresh_token"] if user_flow else ["client_credentials"]
        body = {
            "client_secret": secrets.token_urlsafe(24),
            "grant_types": grants,
            "response_types": ["code"] if user_flow else ["token"],
            "scope": " ".join((*scopes, "offline_access") if user_flow else scopes),
            "redirect_uris": [REDIRECT_URI] if user_flow else [],
            "token_endpoint_auth_method": "client_secret_basic",
        }
        created = self._admin("POST", "/admin/clients", json=body)
        return Client(created["client_id"], created["client_secret"])

    def refresh_token_for(self, client: Client, *, subject: str, scopes: tuple[str, ...] = ("smtp",)) -> str:
        """Walk the authorization code flow as `subject` (login and consent accepted through the admin
        API, where a login UI would) and return the refresh token issued with the first access token."""
        scope = " ".join((*scopes, "offline_access"))
        with httpx.Client(
            verify=self._client_tls(), follow_redirects=False, trust_env=False, timeout=30
        ) as browser:
            response = browser.get(
                f"{self.public_url}/oauth2/auth",
                params={
                    "client_id": client.id,
                    "response_type": "code",
                    "scope": scope,
                    "redirect_uri": REDIRECT_URI,
                    "state": secrets.token_urlsafe(12),
                },
            )
            challenge = _query(response, "login_challenge")
            accepted = self._admin(
                "PUT",
                "/admin/oauth2/auth/requests/login/accept",
                params={"login_challenge": challenge},
                json={"subject": subject},
            )
            challenge = _query(browser.get(accepted["redirect_to"]), "consent_challenge")
            accepted = self._admin(
                "PUT",
                "/admin/oauth2/auth/requests/consent/accept",
                params={"consent_challenge": challenge},
                json={"grant_scope": scope.split()},
            )
            code = _query(browser.get(accepted["redirect_to"]), "code")
            token = browser.post(
                self.token_url,
                data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
                auth=(client.id, client.secret),
            )
        token.raise_for_status()
        refresh: str = token.json()["refresh_token"]
        return refresh

    def client_credentials_token(self, client: Client, *, timeout: float = 30) -> str:
        """An access token as the relay would get it, for tests that talk to Dovecot themselves."""
        response = httpx.post(
            self.token_url,
            data={"grant_type": "client_credentials", "scope": "smtp"},
            auth=(client.id, client.secret),
            timeout=timeout,
            verify=self._client_tls(),
            trust_env=False,
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def revoke_access_tokens(self, client: Client) -> None:
        """Delete every access token issued to `client`: introspection calls them inactive from now on,
        though they have not expired (what an administrator revoking a grant does)."""
        self._admin("DELETE", "/admin/oauth2/tokens", params={"client_id": client.id})

    def issued(self) -> int:
        """Token requests Hydra answered with 200 so far (all clients), counted from its request log."""
        return sum(
            1
            for line in self.log_file.read_text(errors="replace").splitlines()
            if '"path":"/oauth2/token"' in line and '"status":200,' in line
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def _start(self) -> None:
        binary = hydra_binary()
        self._prepare_workdir()
        assert self.tls is not None
        self.dir.mkdir(mode=0o755, parents=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "DSN": "memory",
            "SECRETS_SYSTEM": secrets.token_urlsafe(32),
            "STRATEGIES_ACCESS_TOKEN": "jwt",
            "TTL_ACCESS_TOKEN": f"{self.access_token_ttl}s",
            "URLS_SELF_ISSUER": f"{self.public_url}/",
            # Never visited: the tests accept login and consent through the admin API.
            "URLS_LOGIN": f"http://{HOST}:9/login",
            "URLS_CONSENT": f"http://{HOST}:9/consent",
            "SERVE_PUBLIC_HOST": HOST,
            "SERVE_PUBLIC_PORT": str(self.public_port),
            "SERVE_ADMIN_HOST": HOST,
            "SERVE_ADMIN_PORT": str(self.admin_port),
            "SERVE_TLS_CERT_PATH": str(self.tls.cert_file),
            "SERVE_TLS_KEY_PATH": str(self.tls.key_file),
            "SERVE_TLS_ENABLED": "true",
            "SERVE_ADMIN_TLS_ENABLED": "false",
            # Client secrets are hashed at every token request: a test needs no slow hash.
            "OAUTH2_HASHERS_PBKDF2_ITERATIONS": "1",
            "LOG_LEVEL": "info",
            "LOG_FORMAT": "json",
        }
        self._launch([str(binary), "serve", "all", "--dev"], env=env, cwd=self.dir)
        # Hydra makes its RSA signing keys at the first token request of each flow: seconds of CPU (tens
        # on a loaded machine), and a request that takes Hydra over 10 s (its HTTP write timeout) ends in
        # a cut connection (a TLS "bad record MAC"). Pay that here, not in a test that times tokens.
        confidential, delegated = self.create_client(), self.create_client(user_flow=True)
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                self.client_credentials_token(confidential, timeout=self._startup_timeout)
                self.refresh_token_for(delegated, subject="warm-up")
                return
            except (httpx.HTTPError, PeerError) as error:
                if time.monotonic() > deadline:
                    raise PeerError(f"Hydra issues no token: {error}\n{log_tail(self.log_file)}") from None

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Until both listeners answer /health/ready, the public one over TLS."""
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if proc.poll() is not None:
                raise PeerError(f"Hydra exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError, ssl.SSLError):
                admin = httpx.get(f"{self.admin_url}/health/ready", timeout=2, trust_env=False)
                public = httpx.get(
                    f"{self.public_url}/health/ready", timeout=2, verify=self._client_tls(), trust_env=False
                )
                if admin.status_code == public.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise PeerError(f"not ready within {self._startup_timeout}s")
            time.sleep(0.1)

    def _client_tls(self) -> ssl.SSLContext:
        assert self.tls is not None, "not started"
        return self.tls.client_context()

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.admin_url}{path}", timeout=30, trust_env=False, **kwargs)
        if response.status_code >= 400:
            raise PeerError(f"Hydra {method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None


def _query(response: httpx.Response, name: str) -> str:
    """A parameter of the URL a redirect points at (a challenge, or the authorization code)."""
    location = response.headers.get("location", "")
    values = parse_qs(urlsplit(location).query).get(name)
    if response.status_code not in (302, 303) or not values:
        raise PeerError(f"expected a redirect carrying {name}, got {response.status_code} {location!r}")
    return str(values[0])
