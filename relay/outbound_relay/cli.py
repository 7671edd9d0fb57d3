"""`outbound-relay serve | check | explain | import-momentum`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import signal
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from outbound_relay.config import ClientAuth, ConfigError, load_config
from outbound_relay.generation import Generation, Overrides
from outbound_relay.hardening import disable_core_dumps
from outbound_relay.pool import release_free_memory
from outbound_relay.redaction import REDACTED, SecretRedactor
from outbound_relay.scopes import OAuth2Source, Route, ScopeIndex, Sourced, level_of

log = logging.getLogger("outbound_relay")


def _no_message_data(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("DATA readline")


def _setup_logging(level: str, log_format: str = "text") -> SecretRedactor:
    redactor = SecretRedactor()
    handler = logging.StreamHandler()
    if log_format == "json":
        from outbound_relay.outcomes import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redactor)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line of every session (addresses included) at INFO: at our default
    # level that is five lines per message and a good part of the CPU; keep it for --log-level debug.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # httpx2 (OAuth2 token requests) logs each request at INFO and httpcore its steps at DEBUG; the relay
    # logs what matters about a token request itself.
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Message bodies never reach a log: aiosmtpd logs each line of DATA at debug.
    logging.getLogger("mail.log").addFilter(_no_message_data)
    return redactor


async def _serve(args: argparse.Namespace) -> int:
    from outbound_relay.server import RelayServer

    redactor = _setup_logging(args.log_level, args.log_format)
    overrides = Overrides(
        default_binding=args.default_binding,
        metrics_port=args.metrics_port,
        client_auth=None if args.client_auth is None else ClientAuth(args.client_auth),
    )
    try:
        generation = Generation.load(args.config, overrides)
    except ConfigError as error:
        if not (args.allow_missing_config and not args.config.exists()):
            log.error("%s", error)
            return 2
        log.warning("%s does not exist yet: deferring all mail until it does", args.config)
        generation = Generation.waiting_for(args.config, overrides)
    try:
        server = RelayServer(
            generation,
            config_path=args.config,
            reload_interval=args.reload_interval,
            redactor=redactor,
            overrides=overrides,
        )
    except ConfigError as error:  # listen.tls files that are not a certificate and its key
        log.error("%s", error)
        return 2
    server.handler.log_addresses = args.log_addresses
    await server.start()
    # Start-up (config model, imports) leaves garbage and free heap pages: hand them back, then keep
    # the collector from walking what remains, which lives as long as the process, on every full
    # collection (multi-millisecond pauses under load).
    release_free_memory()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("signal received: no new connections; finishing transactions in flight")
    await server.stop(grace_seconds=args.shutdown_timeout)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    disable_core_dumps()  # before any secret is read
    if not args.uvloop:
        return asyncio.run(_serve(args))
    try:
        import uvloop
    except ImportError:
        print("--uvloop: the uvloop package is not installed (pip install uvloop)", file=sys.stderr)
        return 2
    return uvloop.run(_serve(args))


def _check(args: argparse.Namespace) -> int:
    try:
        generation = Generation.load(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    revision = generation.config.revision
    print(
        f"{args.config}: ok, {len(generation.config.policies)} policies"
        + (f", revision {revision}" if revision else "")
    )
    return 0


def _show(setting: Sourced[object] | None, render: str | None = None) -> tuple[str, str]:
    if setting is None:
        return "(not set)", "-"
    return (render if render is not None else str(setting.value)), setting.source


def explain_route(
    index: ScopeIndex,
    rcpt: str,
    binding: str | None,
    token_expiry: Callable[[str], str] = lambda policy: "unknown (no running relay asked)",
) -> str:
    """What `explain` prints: each setting, its value (secrets redacted) and the scope it came from.
    `token_expiry(policy)` says when the running relay's cached OAuth2 token of that policy expires."""
    config = index.config
    domain = rcpt.rpartition("@")[2]
    binding = binding or config.default_binding
    route: Route = index.route(domain, binding)
    group = config.group_of.get(binding)
    lines = [f"recipient domain {route.domain}, binding {binding}, binding group {group or '(none)'}"]
    if config.revision is not None:
        lines.append(
            f"config revision {config.revision} (the operator's; compare outbound_relay_config_revision_info)"
        )
    tls = route.tls.value
    rows = [
        ("type", _show(route.type)),
        ("user", _show(route.user)),
        (
            "password",
            _show(route.oauth2, "(OAuth2 access token)") if route.oauth2 else _show(route.password, REDACTED),
        ),
        (
            "gateway",
            _show(
                route.gateway,
                f"{route.gateway.value.host}:{route.gateway.value.port}" if route.gateway else None,
            ),
        ),
        (
            "tls",
            _show(
                route.tls,
                f"mode={tls.mode.value} verify={str(tls.verify).lower()}"
                + (f" caFile={tls.ca_file}" if tls.ca_file else ""),
            ),
        ),
        ("maxConnections", _show(route.max_connections)),
    ]
    for name, (value, source) in rows:
        lines.append(f"  {name:<15} {value:<32} from {source}")
    if route.oauth2 is not None:
        lines += _explain_oauth2(route.oauth2.value, token_expiry)
    chain = index.chain(domain, binding)
    lines.append("scopes consulted, most specific first:")
    lines += [f"  {level_of(p).value}. {p.name} ({p.scope.describe()})" for p in chain] or ["  (none)"]
    if route.suspended is not None:
        lines.append(f"mail on this route is deferred (4xx): {route.suspended}")
    elif route.type is None:
        lines.append("no scope sets type: mail on this route is sent without AUTH")
    elif (exposure := route.auth_exposure()) is not None:
        lines.append(f"mail on this route is deferred (4xx): {exposure}")
    elif not route.tls_protects_auth:
        lines.append(f"AUTH goes without verified TLS, as {route.insecure_auth_by} allows")
    return "\n".join(lines)


def _explain_oauth2(source: OAuth2Source, token_expiry: Callable[[str], str]) -> list[str]:
    settings = source.settings
    return [
        f"  the password is an OAuth2 access token from policy {source.policy}'s oauth2 block:",
        f"    tokenUrl {settings.token_url}",
        f"    grant {settings.grant}, clientId {settings.client_id}",
        f"    scopes {' '.join(settings.scopes) or '(none)'}",
        f"    cached token: {token_expiry(source.policy)}",
    ]


def running_token_expiry(metrics_url: str, sources: int) -> Callable[[str], str]:
    """When the running relay's cached token expires, as its metrics endpoint says (read on first use):
    `outbound_relay_oauth2_token_expiry_seconds` is the soonest-expiring of its `sources` token sources,
    so it is the policy's own when there is one source (metrics never carry policy names)."""
    from prometheus_client.parser import text_string_to_metric_families

    read: list[str] = []

    def fetch() -> str:
        try:
            with urllib.request.urlopen(metrics_url, timeout=3) as response:  # noqa: S310 (http only)
                text = response.read().decode()
        except (OSError, ValueError) as problem:
            return f"unknown (the relay's metrics at {metrics_url} cannot be read: {problem})"
        seconds = next(
            (
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "outbound_relay_oauth2_token_expiry_seconds"
            ),
            math.nan,
        )
        if math.isnan(seconds):
            return "none yet (the relay fetches one with the first message that needs it)"
        which = "" if sources == 1 else f" (the soonest of the relay's {sources} token sources)"
        if seconds < 0:
            return f"expired {-seconds:.0f}s ago{which}; the next message that needs it fetches a new one"
        return f"expires in {seconds:.0f}s{which}"

    def expiry(policy: str) -> str:
        if not read:
            read.append(fetch())
        return read[0]

    return expiry


def _explain(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if "@" not in args.rcpt:
        print(f"--rcpt {args.rcpt!r}: expected an address like user@example.com", file=sys.stderr)
        return 2
    port = config.metrics.port if args.metrics_port is None else args.metrics_port
    host = "127.0.0.1" if config.metrics.host in ("0.0.0.0", "::", "") else config.metrics.host
    sources = {(p.name, p.oauth2.identity()) for p in config.policies if p.oauth2 is not None}
    expiry = running_token_expiry(f"http://{host}:{port}/metrics", len(sources))
    print(explain_route(ScopeIndex(config), args.rcpt, args.binding, expiry))
    return 0


def _import_momentum(args: argparse.Namespace) -> int:
    from outbound_relay.momentum_import import MomentumImportError, convert

    try:
        text = args.file.read_text(encoding="utf-8")
        output = convert(
            text,
            source=str(args.file),
            namespace=args.namespace,
            relay_config=args.relay_config,
            strict=args.strict,
        )
    except OSError as error:
        print(f"{args.file}: cannot be read: {error.strerror}", file=sys.stderr)
        return 2
    except MomentumImportError as error:
        print(error, file=sys.stderr)
        return 2
    sys.stdout.write(output)
    for line in output.splitlines():
        if line.startswith("# warning:"):
            print(line.removeprefix("# "), file=sys.stderr)  # also where a person at a terminal sees it
    return 0


def _binding_name(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("a binding name must not be empty")
    return value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbound-relay", description="SMTP relay sidecar that authenticates outbound mail per scope."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, required=True, help="relay.yaml")
    serve.add_argument("--reload-interval", type=float, default=1.0, help="seconds between config checks (1)")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=25.0,
        help="seconds to let transactions finish on SIGTERM (25)",
    )
    serve.add_argument(
        "--default-binding",
        type=_binding_name,
        metavar="NAME",
        help="binding of mail without the binding header; overrides defaultBinding in the file "
        "(the sidecar sets it from the Pod annotation outboundrelay.io/binding)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="overrides metrics.port in the file (0: any free port)",
    )
    serve.add_argument(
        "--client-auth",
        choices=[mode.value for mode in ClientAuth],
        help="overrides listen.clientAuth in the file: AUTH from the app is accepted with any "
        "credentials (accept), names the binding (binding), or is not offered (none)",
    )
    serve.add_argument(
        "--allow-missing-config",
        action="store_true",
        help="start even if the config file does not exist yet, deferring (4xx) all mail until it does "
        "(a sidecar whose Secret the operator has not rendered yet)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object a line (the sidecar's), with each message outcome's fields "
        "at its top level (docs/metrics.md, Logs)",
    )
    serve.add_argument(
        "--log-addresses",
        action="store_true",
        help="put full sender and recipient addresses in message outcome lines; without it, only their "
        "domains (addresses are personal data)",
    )
    serve.add_argument(
        "--uvloop",
        action="store_true",
        help="run on uvloop (needs the uvloop package; see docs/benchmarks.md)",
    )
    serve.set_defaults(run=_run_serve)

    check = commands.add_parser("check", help="validate a relay.yaml (and its hooks) and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(run=_check)

    explain = commands.add_parser("explain", help="show which scope gives each setting for a recipient")
    explain.add_argument("--config", type=Path, required=True)
    explain.add_argument("--rcpt", required=True, help="recipient address")
    explain.add_argument("--binding", help="binding of the message (default: defaultBinding)")
    explain.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="the running relay's metrics port, asked when the cached OAuth2 tokens expire "
        "(default: metrics.port of the file)",
    )
    explain.set_defaults(run=_explain)

    imp = commands.add_parser("import-momentum", help="convert ecelerity.conf stanzas to Kubernetes YAML")
    imp.add_argument("file", type=Path)
    imp.add_argument("--namespace", default="default")
    imp.add_argument("--relay-config", action="store_true", help="emit a relay.yaml instead")
    imp.add_argument("--strict", action="store_true", help="fail on Momentum keys that are not converted")
    imp.set_defaults(run=_import_momentum)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
