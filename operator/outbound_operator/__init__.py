"""outbound-operator: renders OutboundAuthPolicy objects into the relay's config."""
