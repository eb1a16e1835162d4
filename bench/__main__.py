"""`python -m bench [CONFIG]`: run the benchmarks, print the ratios, write bench/out/results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import overhead


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/default.toml"
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    results = {"overhead": overhead.run(config, out / "overhead")}
    print(overhead.report(results["overhead"]))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out / 'results.json'}")


if __name__ == "__main__":
    main()
