"""Container health check: exit 0 when the daemon answers ``GET /healthz`` with 200, else 1.

The image runs it as ``HEALTHCHECK``. Slim images have no curl, so this uses the standard
library only for HTTP; it reads the port (and whether TLS is on) the same way the daemon
does, with :func:`monitor.config.load_config` over the mounted file and the ``LRPILOT_*``
environment, so ``LRPILOT_SERVER__PORT=9000`` moves the daemon and its health check together.

It asks over loopback unless the daemon is bound to one specific address; ``/healthz`` needs
no token and answers every peer.

Usage: ``python healthcheck.py [CONFIG]`` (default ``/etc/lrpilot/config.yaml``).
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_CONFIG = "/etc/lrpilot/config.yaml"
TIMEOUT_SECONDS = 3.0
#: addresses that mean "every interface": the daemon is then reachable on loopback
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "localhost"})


def healthz_url(config_path: Path | None) -> str:
    """The URL of the daemon's /healthz, from its config file and the environment."""
    from monitor.config import load_config

    server = load_config(config_path).server
    host = server.host
    if host in WILDCARD_HOSTS or host.startswith("127."):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if server.tls_cert is not None else "http"
    return f"{scheme}://{host}:{server.port}/healthz"


def check(url: str) -> str | None:
    """None when ``url`` answers 200, else why not."""
    context = None
    if url.startswith("https:"):
        # the certificate names the service, not 127.0.0.1: liveness, not identity, is checked
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as response:
            if response.status == 200:
                return None
            return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str]) -> int:
    config_path = Path(argv[1]) if len(argv) > 1 else Path(DEFAULT_CONFIG)
    try:
        url = healthz_url(config_path if config_path.is_file() else None)
    except Exception as exc:  # a broken config is an unhealthy container, with the reason
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    problem = check(url)
    if problem is not None:
        print(f"healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
