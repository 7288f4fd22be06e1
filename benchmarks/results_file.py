"""Where every benchmark writes its JSON: benchmarks/results/<name>.json, also printed."""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def publish(name: str, result: dict, path: str | None = None) -> None:
    """Writes `result` to benchmarks/results/<name>.json (or to `path`) and prints it."""
    path = path or os.path.join(RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
