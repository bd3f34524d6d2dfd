"""The table of an engine A/B (bench/engine_ab.sh): two engines' engine_throughput.py results,
run after run, and the new engine's figures over the baseline's.

    python3 bench/engine_ab.py OUT_DIR      (reads OUT_DIR/{base,new}-N.json)

Per side: output tokens/s of the 256-request batch and batch-1 ms per token through the engine
(and per bare graph replay), each run, then the median of the runs. Ratios are new / base:
above 1 is faster for throughput, below 1 is faster for latency.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SIDES = ("base", "new")


def load(out: Path) -> dict[str, list[dict]]:
    """side -> the flowserve result of each run, in run order (failed runs left out)."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for side in SIDES:
        files = sorted(out.glob(f"{side}-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        for path in files:
            result = json.loads(path.read_text())["results"].get("flowserve", {})
            if "tokens" in result:
                runs[side].append(result)
    return runs


def figures(result: dict) -> tuple[float, float, float]:
    """(output tok/s, batch-1 ms/token through the engine, ms per bare graph replay)."""
    return (
        result["tokens"] / result["seconds"],
        result["latency_ms"],
        result["graph_ms"] or float("nan"),
    )


def table(runs: dict[str, list[dict]]) -> str:
    lines = [
        f"{'side':<5} {'run':>4} {'out tok/s':>10} {'batch-1 ms/tok':>15} {'graph ms':>9}",
    ]
    medians = {}
    for side in SIDES:
        rows = [figures(r) for r in runs[side]]
        for i, (tps, lat, graph) in enumerate(rows, 1):
            lines.append(f"{side:<5} {i:>4} {tps:>10.0f} {lat:>15.3f} {graph:>9.3f}")
        if rows:
            medians[side] = tuple(statistics.median(col) for col in zip(*rows, strict=True))
            tps, lat, graph = medians[side]
            lines.append(f"{side:<5} {'med':>4} {tps:>10.0f} {lat:>15.3f} {graph:>9.3f}")
    if len(medians) == 2:
        ratio = [n / b for n, b in zip(medians["new"], medians["base"], strict=True)]
        lines.append(
            f"new / base: throughput {ratio[0]:.3f}x, batch-1 latency {ratio[1]:.3f}x, "
            f"graph replay {ratio[2]:.3f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs = load(Path(argv[0]))
    print(table(runs))
    return 0 if all(runs[side] for side in SIDES) else 1


if __name__ == "__main__":
    raise SystemExit(main())
