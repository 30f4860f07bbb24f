"""CI gates: read the run's reports (never re-measure) and judge them against thresholds.

- accuracy: the student beats the majority baseline and keeps at least a floor of the
  teacher's metric (metrics.json): the claim itself, not only the plumbing;
- parity: every engine within its metric and logit thresholds of PyTorch on every dev split
  (parity-*.json), and every answer of the served model, on both engines, within its score
  threshold of PyTorch's (parity-served-*.json; the student's are required, the teacher's judged
  when measured), judged against the thresholds given to the gates, not a verdict stored earlier;
- sparsity: every matrix the student's own recipe prunes reached that recipe's target;
- speed: sparse-on-DeepSparse over dense ratios at batch 1 (bench/bench.json), which were
  measured side by side in one run, so they hold on any machine where absolute times don't.
  A ratio that was not measured fails.
- INT8 (a run trained with --int8): the INT8 student loses at most a few points against the FP32
  student, keeps its sparsity, passes its own parity limits, and clears its speed floor on a CPU
  with native INT8 (AVX512-VNNI or AMX); on other CPUs the speed gate says why it is not judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sparsebert import hardware
from sparsebert.errors import UserError
from sparsebert.runfolder import INT8, RunFolder


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


def _metrics(run: RunFolder) -> dict:
    if not run.metrics_path.is_file():
        raise MissingReport(f"{run.metrics_path} not found; run `sparsebert train --out {run.path}` first")
    return run.metrics


def accuracy_gates(run: RunFolder, floors: dict) -> list[Gate]:
    """On every dev split (MNLI has two): the student beats the majority baseline by a margin
    and keeps a floor of the teacher's main metric."""
    metrics = _metrics(run)
    if "baseline" not in metrics:
        raise MissingReport(f"{run.metrics_path} has no majority baseline; re-run `sparsebert train`")
    metric, margin = metrics["main_metric"], floors["min_points_over_baseline"]
    if not metrics["baseline"]:
        return [Gate("student beats the majority baseline", False, "no dev split was measured")]
    gates = []
    for split, baseline in metrics["baseline"].items():
        student, teacher = metrics["student"]["dev"][split][metric], metrics["teacher"]["dev"][split][metric]
        retention = student / teacher if teacher > 0 else 0.0
        gates += [
            Gate(f"student beats the majority baseline ({split})", student >= baseline[metric] + margin,
                 f"{metric} {student:.2f} vs baseline {baseline[metric]:.2f} (needs +{margin} points)"),
            Gate(f"student retention of the teacher ({split})", retention >= floors["min_retention"],
                 f"{metric} {student:.2f} / teacher {teacher:.2f} = {retention:.1%} (floor {floors['min_retention']:.0%})"),
        ]
        if INT8 in run.checkpoints:
            gates.append(_int8_cost_gate(run, split, metric, student, floors["int8_max_points_below_fp32"]))
    return gates


def _int8_cost_gate(run: RunFolder, split: str, metric: str, student: float, budget: float) -> Gate:
    """What INT8 costs as deployed: the worst engine's metric on the INT8 graph (its parity
    report) against the FP32 student's, not PyTorch's emulation of it."""
    report = _parity_report(run, INT8, served=False, required=True)
    measured = report["splits"].get(split, {}).get("metrics", {})
    engines = {e: m[metric] for e, m in measured.items() if e != "pytorch"}
    name = f"INT8 student against the FP32 student ({split})"
    if not engines:
        return Gate(name, False, "not measured on the INT8 engines")
    engine, int8 = min(engines.items(), key=lambda item: item[1])
    return Gate(name, student - int8 <= budget, f"{metric} {int8:.2f} ({engine}, INT8 graph) vs {student:.2f} "
                                                f"({int8 - student:+.2f} points; at most {budget} below)")


def parity_gates(run: RunFolder, thresholds: dict) -> list[Gate]:
    """The students' engine parity and served answers on every dev split the run measured (the
    teacher's too, where measured), each checkpoint against its own limits."""
    from sparsebert.deploy.thresholds import parity_limits

    gates = []
    for which in run.checkpoints:
        required, limits = which != "teacher", parity_limits(thresholds, which)
        gates += engine_parity_gates(run, which, limits, required)
        gates += served_parity_gates(run, which, limits, required)
    return gates


def _parity_report(run: RunFolder, which: str, served: bool, required: bool) -> dict | None:
    path = run.parity_path(which, served)
    if not path.is_file() and not required:
        return None
    how = f"sparsebert parity {run.path} --checkpoint {which}{' --served' if served else ''}"
    report = _read(path, how)
    if "splits" not in report:
        raise MissingReport(f"{path} was written by an older sparsebert; re-run `{how}`")
    return report


def _unmeasured_splits(run: RunFolder, report: dict, name: str) -> list[Gate]:
    missing = [s for s in run.dev_splits if s not in report["splits"]]
    return [Gate(name, False, f"dev split(s) {missing} not measured")] if missing else []


def engine_parity_gates(run: RunFolder, which: str, limits: dict, required: bool) -> list[Gate]:
    report = _parity_report(run, which, served=False, required=required)
    if report is None:
        return []
    gates = _unmeasured_splits(run, report, f"parity {which}")
    for split, result in report["splits"].items():
        for engine, r in result["against_pytorch"].items():
            passed = (r["metric_difference"] <= limits["max_metric_difference"]
                      and r["max_logit_difference"] <= limits["max_logit_difference"])
            gates.append(Gate(f"parity {which} {engine} ({split})", passed,
                              f"|Δ {report['main_metric']}| {r['metric_difference']:.3f} "
                              f"(max {limits['max_metric_difference']}), max |Δ logit| "
                              f"{r['max_logit_difference']:.1e} (max {limits['max_logit_difference']:.0e})"))
    return gates


def served_parity_gates(run: RunFolder, which: str, limits: dict, required: bool = True) -> list[Gate]:
    """Every dev row answered over HTTP by the server on each engine: labels equal to PyTorch's
    (but for ties), scores within the threshold."""
    from sparsebert.deploy.engines import served_engines

    report = _parity_report(run, which, served=True, required=required)
    if report is None:
        return []
    gates = _unmeasured_splits(run, report, f"served answers {which}")
    for split, engines in report["splits"].items():
        for engine in served_engines(int8=which == INT8):
            r = engines.get(engine)
            if r is None:
                gates.append(Gate(f"served answers {which} {engine} ({split})", False, "not measured"))
                continue
            # label_mismatches is None when the server answered another number of rows
            passed = r["label_mismatches"] == 0 and r["max_score_difference"] <= limits["max_served_score_difference"]
            gates.append(Gate(f"served answers {which} {engine} ({split})", passed,
                              f"{r['answers']} answers over HTTP, {r['label_mismatches']} wrong labels, "
                              f"max |Δ score| {r['max_score_difference']:.1e} "
                              f"(max {limits['max_served_score_difference']:.0e})"))
    return gates


def sparsity_gate(run: RunFolder, tolerance: float = 0.005, which: str = "student") -> Gate:
    """The matrices and their targets come from the recipe SparseML saved beside the student:
    each of its pruning modifiers must match measured matrices, every measured matrix must
    belong to one, and each must be at its modifier's target. The INT8 student, which holds the
    student's zeros, is held to the same targets."""
    from sparsebert.checkpoint import is_pruned
    from sparsebert.recipe import pruning_targets

    metrics = _metrics(run)
    recipe = run.checkpoint("student", only=("recipe.yaml",)) / "recipe.yaml"  # not the weights: a copy may lack them
    if not recipe.is_file():
        raise MissingReport(f"{recipe} not found; the student's recipe says what it prunes")
    measured, targets = metrics[which]["per_matrix_sparsity"], pruning_targets(recipe)
    covered, problems = set(), []
    for patterns, target, ranked_together in targets:
        matched = [n for n in measured if is_pruned(n, patterns)]
        if not matched:
            problems.append(f"params {patterns} match no measured matrix")
        covered.update(matched)
        if ranked_together:  # global magnitude: the target holds over the matrices as a whole
            overall = metrics[which]["encoder_linear_sparsity"]
            if len(targets) > 1:
                problems.append("a global pruning modifier beside others cannot be gated as a whole")
            elif overall < target - tolerance:
                problems.append(f"overall {overall:.2%} < {target:.0%}")
            continue
        problems += [f"{n} {measured[n]:.2%} < {target:.0%}" for n in matched if measured[n] < target - tolerance]
    problems += [f"{n} is pruned by no modifier" for n in measured if n not in covered]
    least = min(measured.values(), default=0.0)
    return Gate(f"{which} sparsity", bool(measured) and not problems,
                f"{len(measured)} matrices, least sparse {least:.2%}; problems: {problems[:3] or 'none'} "
                f"(tolerance {tolerance:.1%})")


def speed_gates(run: RunFolder, floors: dict) -> list[Gate]:
    report = _read(run.bench_dir / "bench.json", f"sparsebert bench {run.path}")
    rows = [r for r in report["ratios"] if r["batch_size"] == 1]
    if not rows:
        return [Gate("speed at batch 1", False, "not measured (no batch-1 ratio in bench.json)")]
    native_int8 = hardware.native_int8(report["machine"].get("cpu_features", []))
    gates = []
    for ratios in rows:
        cap = _floor_cap(run, floors, ratios)
        int8_row = ratios.get("precision") == "int8"
        for key, floor in floors.items():
            if key == "max_floor_share_of_flop_bound":
                continue
            name = key.removeprefix("min_")
            if not name.startswith("sparse_int8_"):  # the cap is the FP32 bound: zeros alone, no INT8
                floor = round(min(floor, cap), 2)
            if name.startswith("sparse_int8_") != int8_row:
                continue  # FP32 floors judge the FP32 students, the INT8 floor the INT8 ones
            label = f"speed {ratios['family']} {ratios['variant']} {name} ({ratios.get('threads', 'all')} thread(s))"
            value = ratios.get(name)
            if int8_row and not native_int8:
                gates.append(Gate(label, True, f"{value:.2f}x, not judged: {report['machine']['cpu']} has no "
                                               "AVX512-VNNI/AMX, where DeepSparse emulates INT8" if value is not None
                                  else "not judged: no AVX512-VNNI/AMX"))
                continue
            gates.append(Gate(label, value is not None and value >= floor,
                              f"{value:.2f}x (floor {floor}x)" if value is not None else "not measured"))
    if INT8 in run.checkpoints and not any(r.get("precision") == "int8" for r in rows):
        gates.append(Gate("speed INT8 student", False, "not measured: the run has an INT8 student but "
                                                         "bench.json has no INT8 row"))
    return gates


def _floor_cap(run: RunFolder, floors: dict, ratios: dict) -> float:
    """The most a speed floor may ask of a bench row: a share of its FLOP bound (the row's own,
    at the bench's length and the sparsity measured in the benchmarked weights, sparsebert/flops.py:
    4.0x at 80%, 9.3x at 95% for the default model; a bench.json from before it had one: the
    student's in metrics.json). The floors are set for 90-95%; an 80% student cannot be asked for
    what only a sparser one gives."""
    share = floors.get("max_floor_share_of_flop_bound")
    bound = ratios.get("flop_bound") or run.metrics["student"].get("flops", {}).get("encoder_flops_reduction")
    return share * bound if share and bound else float("inf")


def check(run: RunFolder | Path, thresholds: dict) -> list[Gate]:
    run = run if isinstance(run, RunFolder) else RunFolder(Path(run))
    sparsity = [sparsity_gate(run, which=which) for which in run.checkpoints if which != "teacher"]
    return [*accuracy_gates(run, thresholds["accuracy"]), *parity_gates(run, thresholds),
            *sparsity, *speed_gates(run, thresholds["speed"])]
