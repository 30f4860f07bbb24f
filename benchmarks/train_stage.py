"""Run the whole training stage on real GLUE tasks and print dense vs sparse dev metrics.

    python benchmarks/train_stage.py --tasks rte mrpc --out runs/bench [--student-epochs 6]

Each task gets its own run folder (teacher/, student/, metrics.json); the table at the end and
``<out>/train_stage.json`` hold the final-model dev metric of both, the retention, the sparsity
measured in the saved student weights, and the wall time. Extra flags go to `sparsebert train`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from sparsebert.cli import main as sparsebert


def run(tasks, out: Path, extra: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        started = time.time()
        code = sparsebert(["train", "--task", task, "--out", str(out / task), *extra])
        if code != 0:
            sys.exit(code)
        m = json.loads((out / task / "metrics.json").read_text())
        dev = next(iter(m["teacher"]["dev"]))
        rows.append({
            "task": task, "metric": m["main_metric"],
            "teacher": m["teacher"]["dev"][dev][m["main_metric"]],
            "student": m["student"]["dev"][dev][m["main_metric"]],
            "retention": m["retention"],
            "sparsity": m["student"]["encoder_linear_sparsity"],
            "minutes": (time.time() - started) / 60,
            "machine": m["machine"],
        })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args, extra = parser.parse_known_args()
    rows = run(args.tasks, args.out, extra)
    print(f"\n{'task':6} {'metric':16} {'dense':>7} {'sparse':>7} {'kept':>7} {'sparsity':>9} {'min':>6}")
    for r in rows:
        print(f"{r['task']:6} {r['metric']:16} {r['teacher']:7.2f} {r['student']:7.2f} "
              f"{r['retention'] * 100:6.1f}% {r['sparsity'] * 100:8.2f}% {r['minutes']:6.1f}")
    mean = sum(r["retention"] for r in rows) / len(rows)
    print(f"mean retention {mean * 100:.1f}% of the dense teacher (target >= 97%); machine: {rows[0]['machine']}")
    (args.out / "train_stage.json").write_text(json.dumps({"rows": rows, "mean_retention": mean}, indent=2))


if __name__ == "__main__":
    main()
