"""A generation: one loaded relay.yaml with everything derived from it (scope index, hook chain, digest).
The reloader swaps the current generation; a transaction keeps the one it started with."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from outbound_relay.config import ClientAuth, RelayConfig, fingerprint, read_config, watched_files
from outbound_relay.scopes import ScopeIndex

if TYPE_CHECKING:
    from outbound_relay.hooks import HookChain


# The config digest covers passwords: shown (metrics, logs) only keyed with this, so that it cannot serve
# to test password guesses offline. It tells generations apart within one relay process.
_DIGEST_KEY = secrets.token_bytes(16)


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """`serve` flags that beat relay.yaml, in force across reloads (the sidecar sets them per Pod)."""

    default_binding: str | None = None
    metrics_port: int | None = None
    client_auth: ClientAuth | None = None

    def apply(self, config: RelayConfig) -> RelayConfig:
        if self.default_binding is not None:
            config = config.model_copy(update={"default_binding": self.default_binding})
        if self.metrics_port is not None:
            metrics = config.metrics.model_copy(update={"port": self.metrics_port})
            config = config.model_copy(update={"metrics": metrics})
        if self.client_auth is not None:
            listen = config.listen.model_copy(update={"client_auth": self.client_auth})
            config = config.model_copy(update={"listen": listen})
        return config


NO_OVERRIDES = Overrides()


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One loaded config with everything derived from it; a transaction keeps the one it started with."""

    config: RelayConfig
    scopes: ScopeIndex
    hooks: HookChain | None  # None when relay.yaml names no hook
    digest: str
    files: tuple[Path, ...] = ()
    missing: Path | None = None  # `serve --allow-missing-config` before the file exists: defer all mail

    @classmethod
    def load(cls, path: Path, overrides: Overrides = NO_OVERRIDES) -> Generation:
        config, digest = read_config(path)
        config = overrides.apply(config)
        return cls.build(config, base_dir=path.parent, digest=digest, files=watched_files(config, path))

    @classmethod
    def waiting_for(cls, path: Path, overrides: Overrides = NO_OVERRIDES) -> Generation:
        """No config yet (a sidecar started before the operator rendered one): every message is deferred
        until the file appears, and the poller notices it does."""
        config = overrides.apply(RelayConfig())
        return cls(
            config=config,
            scopes=ScopeIndex(config),
            hooks=None,
            digest=fingerprint((path,)),
            files=(path,),
            missing=path,
        )

    @classmethod
    def build(
        cls, config: RelayConfig, *, base_dir: Path, digest: str = "", files: tuple[Path, ...] = ()
    ) -> Generation:
        hooks = None
        if config.hooks.lua or config.hooks.python:
            # Only then: the hook machinery and its Lua runtime are ~1.7 MB of a sidecar's memory.
            from outbound_relay.hooks import HookChain

            hooks = HookChain.load(config.hooks, base_dir)
        return cls(config=config, scopes=ScopeIndex(config), hooks=hooks, digest=digest, files=files)

    @property
    def short_digest(self) -> str:
        if not self.digest:
            return "inline"
        return hmac.new(_DIGEST_KEY, self.digest.encode(), hashlib.sha256).hexdigest()[:12]
