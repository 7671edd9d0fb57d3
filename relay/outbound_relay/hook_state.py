"""What hooks read and write, and their limits: shared by the relay, its Python hooks and the Lua worker
process, without loading Lua (only the worker process needs lupa)."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from typing import Final

VCTX_MESS: Final = 1  # Momentum's message-context scope; the relay has no connection context
MAX_CONTEXT_KEY_BYTES: Final = 256
MAX_CONTEXT_VALUE_BYTES: Final = 65536  # room for a large XOAUTH2 access token (JWT)
MAX_CONTEXT_KEYS: Final = 256
MAX_BINDING_BYTES: Final = 256


@dataclass(kw_only=True)
class MessageState:
    """What the hooks read and change for one message; a private copy per call, applied by the caller
    only when every hook finished in time."""

    mailfrom: str
    rcptto: tuple[str, ...]
    headers: Message
    binding: str
    context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LuaScript:
    name: str  # as configured (relative path); used in Lua error positions and in our messages
    source: str
