"""The README stays what a newcomer can read: at most 250 lines, and its first two commands are the
whole set-up (`make run`, `make test`); the rest lives in docs/ guides, whose links must resolve."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_is_short_and_starts_with_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    commands = re.findall(r"^(make \w+)", text, flags=re.MULTILINE)
    assert commands[:2] == ["make run", "make test"]


def test_every_local_link_of_the_readme_resolves():
    text = (ROOT / "README.md").read_text()
    links = [m.split("#")[0] for m in re.findall(r"\]\(([^)]+)\)", text) if not m.startswith("http")]
    assert links and all((ROOT / link).exists() for link in links), [l for l in links if not (ROOT / l).exists()]
