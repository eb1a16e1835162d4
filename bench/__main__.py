"""`python -m bench [overhead] [multitask] [federated] [deployed] [privacy] [clock] [population]`: run the benchmarks (default: all), print the ratios,
write bench/out/results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import clock, deployed, federated, multitask, overhead, population, privacy


def main() -> None:
    which = sys.argv[1:] or ["overhead", "multitask", "federated", "deployed", "privacy", "clock", "population"]
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if "overhead" in which:
        results["overhead"] = overhead.run("configs/default.toml", out / "overhead")
        print(overhead.report(results["overhead"]))
        # The same on the shipped real-sized config (28×28 images, ~1.5 min of training a side):
        # how much of the overhead is fixed per run, and how much grows with the training.
        results["overhead_digits28"] = overhead.run("configs/digits28.toml", out / "overhead28", breakdown=False)
        print(overhead.report(results["overhead_digits28"],
                              results["overhead"]["library_floor"]["mlflow_package_scan_s"]))
    if "multitask" in which:
        results["multitask"] = multitask.run()
        print(multitask.report(results["multitask"]))
    if "federated" in which:
        results["federated"] = federated.run(out / "federated")
        print(federated.report(results["federated"]))
    if "deployed" in which:
        results["deployed"] = deployed.run(out / "deployed")
        print(deployed.report(results["deployed"]))
    if "privacy" in which:
        results["privacy"] = privacy.run(out / "privacy")
        print(privacy.report(results["privacy"]))
    if "clock" in which:
        results["clock"] = clock.run(out / "clock")
        print(clock.report(results["clock"]))
    if "population" in which:
        results["population"] = population.run(out / "population")
        print(population.report(results["population"]))
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
