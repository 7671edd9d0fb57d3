"""OAuth2 access tokens for XOAUTH2 policies with an `oauth2` block (RFC 6749).

One cache entry per (policy, token source): the access token, when to fetch the next one, and the refresh
token in force (an endpoint that rotates refresh tokens returns a new one with each access token; the old
one may stop working at once, so the newest is used from then on). It lives in memory only: after a
restart the relay starts again from the refresh token in relay.yaml.

However many messages wait for a token, one request per entry is in flight; they all get its result. A
request that fails is remembered for a short, growing delay, so a token endpoint that is down or refuses
is not asked again for every message meanwhile; those messages are deferred (4xx) with the same reply.

The protocol (request bodies, client authentication, error responses) is Authlib's; HTTP is httpx2's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from outbound_relay.config import OAuth2Settings
from outbound_relay.errors import RelayError
from outbound_relay.metrics import RelayMetrics, TokenResult
from outbound_relay.scopes import OAuth2Source

log = logging.getLogger(__name__)

# A token is replaced this long before it expires (but never sooner than MARGIN_FRACTION of its life), so
# one handed out is still good when the upstream checks it.
MARGIN_SECONDS = 60.0
MARGIN_FRACTION = 0.1
# RFC 6749 5.1 makes expires_in optional; without it a token is taken to live this long.
DEFAULT_LIFETIME = 300.0
# After a failed request, the next waits at least this long, doubling up to RETRY_DELAY_MAX.
RETRY_DELAY = 1.0
RETRY_DELAY_MAX = 60.0
# Text from the token endpoint quoted in replies and logs is cut to this length.
MAX_QUOTED = 200


class TokenUnavailable(RelayError):
    """No access token could be had for a policy: the endpoint was unreachable, answered garbage, or
    refused. Temporary to the client (RFC 4954's 454 4.7.0): a fixed endpoint or secret lets it through."""

    def __init__(self, text: str, *, refused: bool) -> None:
        super().__init__(454, "4.7.0", text)
        self.text = text
        self.refused = refused


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    fetched: bool  # requested for this very call (else: from the cache, or another caller's request)


class _Problem(Exception):
    """Why a request failed, before the policy and endpoint are put in front of it."""

    def __init__(self, text: str, *, refused: bool) -> None:
        super().__init__(text)
        self.text = text
        self.refused = refused


@dataclass(eq=False)
class _Entry:
    policy: str
    refresh_token: str | None  # the one in force: from relay.yaml, or rotated by the endpoint since
    access_token: str | None = None
    expires_at: float = 0.0  # time.monotonic()
    renew_at: float = 0.0  # time.monotonic(): past it, the token is not handed out any more
    inflight: asyncio.Task[str] | None = None
    failure: TokenUnavailable | None = None
    failures: int = 0
    retry_at: float = 0.0
    requests: int = 0  # token requests made for this entry
    secrets: tuple[str, ...] = field(default_factory=tuple)  # of this entry: tokens, for the redactor


class TokenProvider:
    """Access tokens per (policy, token source), fetched on demand, shared, and renewed before expiry."""

    def __init__(
        self,
        metrics: RelayMetrics,
        *,
        timeout: float = 30.0,
        on_secrets: Callable[[Iterable[str]], None] | None = None,
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        self.metrics = metrics
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._on_secrets = on_secrets
        self._entries: dict[tuple[str, str], _Entry] = {}
        metrics.oauth2_token_expiry.set_function(self._gauge)

    # -- what AUTH uses ----------------------------------------------------------------------------

    async def token(self, source: OAuth2Source, *, refused: str | None = None) -> AccessToken:
        """A current access token for `source`. `refused`: a token the upstream just refused; unless a
        newer one has replaced it meanwhile, it is dropped and a new one requested."""
        entry = self._entry(source)
        now = time.monotonic()
        if refused is not None and entry.access_token == refused:
            entry.access_token = None
        if entry.access_token is not None and now < entry.renew_at:
            return AccessToken(entry.access_token, fetched=False)
        fetched = entry.inflight is None
        if entry.inflight is None:
            if entry.failure is not None and now < entry.retry_at:
                raise entry.failure
            entry.inflight = asyncio.get_running_loop().create_task(
                self._request(entry, source.settings), name=f"oauth2-token {entry.policy}"
            )
            entry.inflight.add_done_callback(lambda task: self._settled(entry, task))
        # Shielded: one waiter giving up (its client hung up) must not cancel the request for the rest.
        return AccessToken(await asyncio.shield(entry.inflight), fetched=fetched)

    # -- what the relay around it uses ---------------------------------------------------------------

    def retain(self, sources: Iterable[OAuth2Source]) -> None:
        """Forget the entries of sources no longer in the config, keep the rest: a reload that leaves a
        policy's oauth2 block alone keeps its token and rotated refresh token."""
        keep = {(s.policy, s.identity()) for s in sources}
        for key in [key for key in self._entries if key not in keep]:
            # A request in flight finishes for those waiting on it; its entry is gone all the same.
            del self._entries[key]
        self._publish_secrets()

    def expires_in(self) -> float | None:
        """Seconds until the soonest-expiring cached token expires (negative: expired), None without."""
        found = [e.expires_at for e in self._entries.values() if e.access_token is not None]
        return min(found) - time.monotonic() if found else None

    def secrets(self) -> list[str]:
        """The tokens held now (access and rotated refresh tokens): never to be logged."""
        return [s for e in self._entries.values() for s in e.secrets]

    def requests(self, source: OAuth2Source) -> int:
        entry = self._entries.get((source.policy, source.identity()))
        return 0 if entry is None else entry.requests

    async def close(self) -> None:
        """Cancel requests still in flight (at shutdown, after the last transaction)."""
        tasks = [e.inflight for e in self._entries.values() if e.inflight is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- internals --------------------------------------------------------------------------------

    def _entry(self, source: OAuth2Source) -> _Entry:
        key = (source.policy, source.identity())
        entry = self._entries.get(key)
        if entry is None:
            refresh = source.settings.refresh_token
            entry = _Entry(source.policy, refresh.get_secret_value() if refresh is not None else None)
            self._entries[key] = entry
        return entry

    def _gauge(self) -> float:
        remaining = self.expires_in()
        return float("nan") if remaining is None else remaining

    def _settled(self, entry: _Entry, task: asyncio.Task[str]) -> None:
        entry.inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here, so a request nobody awaits any more is not reported

    async def _request(self, entry: _Entry, settings: OAuth2Settings) -> str:
        entry.requests += 1
        where = f"OAuth2 token for policy {entry.policy} from {settings.token_url}"
        # expires_in counts from when the endpoint issued the token: somewhere between our request and
        # its answer; counting from the request errs on the safe side.
        sent = time.monotonic()
        try:
            token = await self._fetch(entry, settings)
            access_token, lifetime = _parse(token)
        except _Problem as problem:
            return self._failed(entry, TokenUnavailable(f"{where}: {problem.text}", refused=problem.refused))
        rotated = token.get("refresh_token")
        if isinstance(rotated, str) and rotated and entry.refresh_token is not None:
            entry.refresh_token = rotated
        entry.access_token = access_token
        entry.expires_at = sent + lifetime
        entry.renew_at = entry.expires_at - min(MARGIN_SECONDS, lifetime * MARGIN_FRACTION)
        entry.failure, entry.failures = None, 0
        entry.secrets = tuple(s for s in (access_token, entry.refresh_token) if s)
        self._publish_secrets()
        self.metrics.oauth2_token_requests.labels(result=TokenResult.SUCCESS).inc()
        log.info("%s: new access token, expires in %.0fs", where, lifetime)
        return access_token

    async def _fetch(self, entry: _Entry, settings: OAuth2Settings) -> dict[str, Any]:
        """The token endpoint's answer, or a _Problem saying why there is none."""
        # Imported on first use: Authlib and httpx2 add some 13 MB to the relay's memory, which a sidecar
        # without oauth2 policies need not pay.
        import httpx2
        from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

        secret = settings.client_secret.get_secret_value() if settings.client_secret else None
        try:
            verify: ssl.SSLContext | bool = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
        except (OSError, ssl.SSLError) as error:
            raise _Problem(
                f"oauth2.caFile {settings.ca_file} cannot be used: {_reason(error)}", refused=False
            ) from None
        try:
            async with AsyncOAuth2Client(
                client_id=settings.client_id,
                client_secret=secret,
                # RFC 6749 2.3.1: HTTP Basic is what every server must accept; a public client (no
                # secret) only names itself.
                token_endpoint_auth_method="client_secret_basic" if secret else "none",
                scope=" ".join(settings.scopes) or None,
                verify=verify,
                timeout=self.timeout,
                trust_env=False,  # no proxy or netrc from the environment: they could see the secret
            ) as client:
                if entry.refresh_token is not None:
                    token = await client.refresh_token(settings.token_url, refresh_token=entry.refresh_token)
                else:
                    token = await client.fetch_token(settings.token_url, grant_type="client_credentials")
        except OAuthError as error:
            text = f"the token endpoint refused ({_quote(error.error, settings)}"
            if error.description:
                text += f": {_quote(error.description, settings)}"
            raise _Problem(text + ")", refused=True) from None
        except httpx2.TimeoutException:
            raise _Problem("no answer from the token endpoint: timed out", refused=False) from None
        except (httpx2.HTTPError, OSError, ssl.SSLError, ValueError) as error:
            # ValueError: a body that is not JSON (a proxy's error page, say).
            text = f"no usable answer from the token endpoint: {_reason(error)}"
            raise _Problem(text, refused=False) from None
        return dict(token)

    def _failed(self, entry: _Entry, error: TokenUnavailable) -> str:
        result = TokenResult.REFUSED if error.refused else TokenResult.UNAVAILABLE
        self.metrics.oauth2_token_requests.labels(result=result).inc()
        entry.failures += 1
        delay = min(self.retry_delay * 2 ** (entry.failures - 1), RETRY_DELAY_MAX)
        entry.failure, entry.retry_at = error, time.monotonic() + delay
        log.warning("%s; mail for it is deferred for the next %gs at least", error.text, delay)
        raise error

    def _publish_secrets(self) -> None:
        if self._on_secrets is not None:
            self._on_secrets(self.secrets())


def _parse(token: dict[str, Any]) -> tuple[str, float]:
    """The access token and its lifetime in seconds, from a successful response (RFC 6749 5.1)."""
    access_token = token.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _Problem("the token endpoint answered without an access_token", refused=False)
    token_type = token.get("token_type")
    if isinstance(token_type, str) and token_type.lower() != "bearer":
        raise _Problem(
            f"the endpoint issued a {token_type!r} token; XOAUTH2 needs a Bearer token", refused=True
        )
    expires_in = token.get("expires_in")
    try:
        lifetime = float(expires_in) if expires_in is not None else DEFAULT_LIFETIME
    except (TypeError, ValueError):
        lifetime = DEFAULT_LIFETIME
    return access_token, max(lifetime, 0.0)


def _quote(text: object, settings: OAuth2Settings) -> str:
    """Endpoint-supplied text, on one line, cut short, and with our secrets blanked should it echo any."""
    quoted = " ".join(str(text).split())[:MAX_QUOTED]
    for secret in settings.secrets():
        quoted = quoted.replace(secret, "***")
    return quoted


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return " ".join((str(error) or type(error).__name__).split())[:MAX_QUOTED]
