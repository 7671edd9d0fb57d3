"""outbound-relay: an SMTP relay sidecar that authenticates outbound mail per scope."""

__version__ = "0.1.0"
