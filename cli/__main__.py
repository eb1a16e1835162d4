"""``python -m lifelong.cli``: the ``lifelong`` command."""

from lifelong.cli.main import app

app()
