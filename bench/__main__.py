"""`make bench`: the end-to-end SMTP benchmark, outbound-relay beside Postfix (bench/smtp_bench.py).

python -m bench [--quick] [--messages N] [--postfix-messages N] [--rounds N] [--no-postfix]
                [--no-postfix-reuse] [--no-relay-defaults] [--relay-arg=--some-flag ...] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from bench.smtp_bench import QUICK, Settings, main


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="End-to-end SMTP benchmark on loopback: outbound-relay (tuned pool and defaults), "
        "Postfix as a SASL relay (defaults and with TLS connection reuse) and a pooled client, all to "
        "Dovecot submission (STARTTLS, AUTH PLAIN) relaying to smtp-sink.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer messages and one round (one to two minutes)"
    )
    parser.add_argument(
        "--messages", type=int, help=f"per throughput run ({defaults.messages}; quick {QUICK.messages})"
    )
    parser.add_argument(
        "--postfix-messages",
        type=int,
        help=f"through Postfix ({defaults.postfix_messages}; quick {QUICK.postfix_messages})",
    )
    parser.add_argument(
        "--latency-messages",
        type=int,
        help=f"per path in the latency run ({defaults.latency_messages}; quick {QUICK.latency_messages})",
    )
    parser.add_argument(
        "--latency-rate", type=float, help=f"msg/s of the latency runs ({defaults.latency_rate:g})"
    )
    parser.add_argument(
        "--sessions", type=int, help=f"parallel sessions and relay pool size ({defaults.sessions})"
    )
    parser.add_argument("--size", type=int, help=f"message body bytes ({defaults.size})")
    parser.add_argument(
        "--rounds", type=int, help=f"interleaved ceiling/relay runs, best counts ({defaults.rounds})"
    )
    parser.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for outbound-relay serve",
    )
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix runs (they need root)")
    parser.add_argument(
        "--no-postfix-reuse",
        action="store_true",
        help="skip the Postfix run with smtp_tls_connection_reuse = yes",
    )
    parser.add_argument(
        "--no-relay-defaults",
        action="store_true",
        help="skip the relay run with relay.yaml defaults (pool size included)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the relay under pyinstrument (throughput only; numbers are then not comparable)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings()
    overrides = {
        name: getattr(args, name)
        for name in (
            "messages",
            "postfix_messages",
            "latency_messages",
            "latency_rate",
            "sessions",
            "size",
            "rounds",
        )
        if getattr(args, name) is not None
    }
    if args.relay_arg:
        overrides["relay_args"] = tuple(args.relay_arg)
    if args.no_postfix_reuse:
        overrides["postfix_reuse"] = False
    if args.no_relay_defaults:
        overrides["relay_defaults"] = False
    return dataclasses.replace(base, **overrides)


if __name__ == "__main__":
    arguments = parse()
    sys.exit(
        main(
            settings_from(arguments),
            mode="quick" if arguments.quick else "full",
            with_postfix=not arguments.no_postfix,
            profile=arguments.profile,
        )
    )
