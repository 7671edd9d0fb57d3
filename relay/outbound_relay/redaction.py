"""Defence in depth for "secrets never reach logs": whatever a log line says, the passwords and tokens
of the config in force are replaced by `***` before any handler writes it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

REDACTED = "***"
# Shorter values would blank out ordinary words; they are still never logged on purpose.
MIN_SECRET_LENGTH = 4


class SecretRedactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self._by_kind: dict[str, frozenset[str]] = {}

    def set_secrets(self, secrets: Iterable[str], *, kind: str = "config") -> None:
        """Replace the secrets of one kind: "config" (passwords, client secrets) when a config loads,
        "oauth2" (access and refresh tokens) whenever a token endpoint issues new ones."""
        self._by_kind[kind] = frozenset(s for s in secrets if len(s) >= MIN_SECRET_LENGTH)
        # Longest first, so a secret that contains another is replaced whole.
        found = set().union(*self._by_kind.values())
        self._secrets = tuple(sorted(found, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        # A message outcome line (outcomes.py) is made of fields that never hold a secret: no need to
        # render its text here, which JSON output never does.
        if self._secrets and not hasattr(record, "outcome_fields"):
            message = record.getMessage()
            redacted = self.redact(message)
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.redact(record.stack_info)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True
