"""CI gates: read the run's reports (never re-measure) and judge them against thresholds.

- parity: every engine within its metric and logit thresholds of PyTorch (parity-*.json);
- sparsity: the saved student reached the recipe's target (metrics.json);
- speed: sparse-on-DeepSparse over dense ratios at batch 1 (bench/bench.json), which were
  measured side by side in one run, so they hold on any machine where absolute times don't.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sparsebert.errors import UserError


class MissingReport(UserError):
    pass


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


def _read(path: Path, how: str) -> dict:
    if not path.is_file():
        raise MissingReport(f"{path} not found; run `{how}` first")
    return json.loads(path.read_text())


def parity_gates(run: Path) -> list[Gate]:
    gates = []
    for which in ("student", "teacher"):
        path = run / f"parity-{which}.json"
        if which == "teacher" and not path.is_file():
            continue  # the teacher's parity is optional; the student's is required
        report = _read(path, f"sparsebert parity {run}")
        for engine, result in report["against_pytorch"].items():
            gates.append(Gate(f"parity {which} {engine}", result["passed"],
                              f"|Δ {report['main_metric']}| {result['metric_difference']:.3f} "
                              f"(max {report['thresholds']['max_metric_difference']}), max |Δ logit| "
                              f"{result['max_logit_difference']:.1e} (max {report['thresholds']['max_logit_difference']:.0e})"))
    return gates


def sparsity_gate(run: Path, tolerance: float = 0.005) -> Gate:
    metrics = _read(run / "metrics.json", f"sparsebert train --out {run}")
    target = metrics["config"]["student"]["recipe_args"].get("final_sparsity", 0.95)
    least = metrics["student"]["min_matrix_sparsity"]
    return Gate("student sparsity", least >= target - tolerance,
                f"least sparse matrix {least:.2%}, target {target:.2%} (tolerance {tolerance:.1%})")


def speed_gates(run: Path, floors: dict) -> list[Gate]:
    report = _read(run / "bench" / "bench.json", f"sparsebert bench {run}")
    gates = []
    for ratios in report["ratios"]:
        if ratios["batch_size"] != 1:
            continue
        for key, floor in floors.items():
            name = key.removeprefix("min_")
            value = ratios.get(name)
            gates.append(Gate(f"speed {ratios['family']} {ratios['variant']} {name}", value is not None and value >= floor,
                              f"{value:.2f}x (floor {floor}x)" if value is not None else "not measured"))
    return gates


def check(run: Path, thresholds: dict) -> list[Gate]:
    return [*parity_gates(run), sparsity_gate(run), *speed_gates(run, thresholds["speed"])]
