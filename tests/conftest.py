"""Test session set-up: Lifelong's state (Prefect's home) goes to a temporary folder.

This runs before any test imports ``lifelong``, whose import configures Prefect from it.
"""

import os
import tempfile

os.environ.setdefault("LIFELONG_HOME", tempfile.mkdtemp(prefix="lifelong-test-home-"))
os.environ.pop("PREFECT_API_URL", None)  # tests start their own API (ephemeral or a real server)
