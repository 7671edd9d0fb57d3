"""`/healthz` on the metrics port: 200 "ok" while the relay can do its work, 503 with the reason when it
cannot and only a restart can help (today: hooks are configured but cannot run). For a liveness probe."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

HEALTH_PATH = "/healthz"


def with_health(app: WSGIApplication, check: Callable[[], str | None]) -> WSGIApplication:
    """`app` (the metrics) with HEALTH_PATH in front; `check()` gives None or why the relay is unhealthy
    (safe to show: no secrets, no message data). It runs in the HTTP server's thread."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return app(environ, start_response)
        try:
            reason = check()
        except Exception as error:  # a bug in a check must show as unhealthy, not as a 500 page
            reason = f"the health check failed: {type(error).__name__}"
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        if reason is None:
            start_response("200 OK", headers)
            return [b"ok\n"]
        start_response("503 Service Unavailable", headers)
        return [f"unhealthy: {reason}\n".encode()]

    return serve
