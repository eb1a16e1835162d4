"""Container health check: GET $HEALTHCHECK_URL (or the URL given) must answer 200 within 5 s.

With neither (a one-off `lifelong` command rather than a service) there is nothing to check, and
it says so. Standard library only: the image has no curl.
"""

import os
import sys
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HEALTHCHECK_URL", "")
if not url:
    print("no HEALTHCHECK_URL: not a service container")
    sys.exit(0)
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"{url}: {exc}")
    sys.exit(1)
