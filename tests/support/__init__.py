"""In-process helpers for relay tests: an authenticating aiosmtpd upstream and a relay runner."""
