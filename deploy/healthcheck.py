"""Container health check: exit 0 iff the local server answers 200 on its readiness route.

Used by the Dockerfile's HEALTHCHECK and docker-compose's healthcheck (no curl in slim images). Reads
MIXINFER_PORT (default 8000) and MIXINFER_HEALTH_URL (overrides the whole URL); standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

READY_PATH = "/v2/health/ready"


def main() -> int:
    """Return the process exit code: 0 when ready, 1 otherwise (reason on stderr)."""
    port = os.environ.get("MIXINFER_PORT", "8000")
    url = os.environ.get("MIXINFER_HEALTH_URL", f"http://127.0.0.1:{port}{READY_PATH}")
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"not ready: {url} unreachable: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"not ready: {url} answered {status}, expected 200\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
