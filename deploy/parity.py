"""Accuracy parity, on every dev split of the task (MNLI: matched and mismatched).

- engines: the same fixed-length inputs through every engine of the table that runs the model
  (engines.TABLE); the task metric of each side by side and the largest logit difference
  against PyTorch;
- served: the running server (our validating app, on each engine) is sent the dev rows over
  HTTP, and each answer (label and score) is compared with what the PyTorch checkpoint answers
  for the same text: correctness of what a client gets, not only of the engine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from sparsebert import atomic, checkpoint, glue, inference
from sparsebert.deploy.engines import Runner, engines_for, run_batched, served_engines


def parity(task: glue.GlueTask, model_dir: Path, deployment: Path, dev_sets: dict[str, list[dict]],
           thresholds: dict, batch_size: int = 16, sequence_length: int = 128) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deployment)
    id2label = inference.label_names(AutoConfig.from_pretrained(deployment).id2label, f"{deployment}/config.json")
    names = inference.onnx_input_names(deployment / "model.onnx")
    inputs = {split: inference.encode(tokenizer, examples, names, sequence_length, fixed_length=True)
              for split, examples in dev_sets.items()}
    logits = {split: {} for split in dev_sets}
    # One runner per engine (DeepSparse compiles once) for every split.
    for engine in engines_for(int8=checkpoint.is_quantized(model_dir)):
        runner = Runner(engine, model_dir, deployment, batch_size, sequence_length)
        try:
            for split in dev_sets:
                logits[split][engine] = run_batched(runner, inputs[split])
        finally:
            runner.close()
    splits = {split: _split_parity(task, logits[split], dev_sets[split], id2label, thresholds)
              for split in dev_sets}
    return {"task": task.name, "main_metric": task.main_metric, "sequence_length": sequence_length,
            "batch_size": batch_size, "model": str(model_dir), "deployment": str(deployment),
            "splits": splits, "thresholds": thresholds,
            "passed": all(s["passed"] for s in splits.values())}


def _split_parity(task, logits: dict, examples: list[dict], id2label: dict, thresholds: dict) -> dict:
    metrics = {engine: glue.score(task, logits[engine], examples, id2label) for engine in logits}
    against = {}
    for engine in [e for e in logits if e != "pytorch"]:
        metric_diff = abs(metrics[engine][task.main_metric] - metrics["pytorch"][task.main_metric])
        logit_diff = float(np.abs(logits[engine] - logits["pytorch"]).max())
        against[engine] = {
            "metric_difference": metric_diff,
            "max_logit_difference": logit_diff,
            "agreement": None if task.is_regression
            else float((logits[engine].argmax(1) == logits["pytorch"].argmax(1)).mean()),
            "passed": metric_diff <= thresholds["max_metric_difference"]
            and logit_diff <= thresholds["max_logit_difference"],
        }
    return {"examples": len(examples), "metrics": metrics, "against_pytorch": against,
            "passed": all(a["passed"] for a in against.values())}


# ---------------------------------------------------------------- the served model


def probability_margins(logits: np.ndarray) -> np.ndarray:
    """Top minus second probability of each row: below a tolerance, a flipped label is a tie."""
    if logits.shape[1] < 2:
        return np.full(len(logits), np.inf)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    top2 = np.sort(shifted / shifted.sum(axis=1, keepdims=True), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def compare_answers(expected: tuple[list, list], got: tuple[list, list], margins: np.ndarray,
                    tolerance: float) -> dict:
    """Served vs PyTorch answers, row by row. A different label fails unless PyTorch's own top
    two probabilities are within ``2 * tolerance`` (a tie); a score further than ``tolerance``
    from PyTorch's fails (a sigmoid of a regression value, a softmax on the wrong axis...)."""
    (want_labels, want_scores), (got_labels, got_scores) = expected, got
    if len(got_labels) != len(want_labels) or len(got_scores) != len(want_scores):
        return {"answers": len(got_labels), "expected": len(want_labels), "label_mismatches": None,
                "ties_flipped": None, "max_score_difference": float("inf"), "passed": False,
                "problems": [f"the server answered {len(got_labels)} rows for {len(want_labels)}"]}
    flipped = [i for i, (a, b) in enumerate(zip(want_labels, got_labels)) if a != b]
    ties = [i for i in flipped if margins[i] < 2 * tolerance]
    same_label = [i for i in range(len(want_labels)) if want_labels[i] == got_labels[i]]
    score_diff = max((abs(want_scores[i] - got_scores[i]) for i in same_label), default=0.0)
    problems = [f"row {i}: label {got_labels[i]!r}, PyTorch {want_labels[i]!r}" for i in flipped if i not in ties]
    problems += [f"row {i}: score {got_scores[i]:.6g}, PyTorch {want_scores[i]:.6g}" for i in same_label
                 if abs(want_scores[i] - got_scores[i]) > tolerance]
    return {"answers": len(got_labels), "label_mismatches": len(flipped) - len(ties), "ties_flipped": len(ties),
            "max_score_difference": float(score_diff), "problems": problems[:5], "passed": not problems}


def ask_server(client, examples: list[dict], request_size: int) -> tuple[list[str], list[float]]:
    """Labels and scores for the dev rows, ``request_size`` rows per HTTP request."""
    from sparsebert.deploy.client import ClientError
    from sparsebert.errors import UserError

    labels, scores = [], []
    for start in range(0, len(examples), request_size):
        try:
            answer = client.classify(inference.as_sequences(examples[start:start + request_size]))
        except ClientError as error:
            raise UserError(f"the server refused dev rows {start}-{start + request_size - 1}: {error}") from None
        labels += answer.labels
        scores += answer.scores
    return labels, scores


def reference_logits(reference: str, model_dir: Path, deployment: Path, examples: list[dict],
                     sequence_length: int) -> np.ndarray:
    """What the served answers are held to: the PyTorch checkpoint, or an engine run directly on
    the deployment's own graph, each row on the bucket the server runs it on (an INT8 graph,
    which PyTorch only emulates and whose engines round apart from each other)."""
    if reference == "pytorch":
        return inference.torch_logits(model_dir, examples, sequence_length, tokenizer_dir=deployment)
    from transformers import AutoTokenizer

    from sparsebert.deploy.bench import bucket_of, encode_each
    from sparsebert.deploy.serve import default_sequence_lengths

    buckets = list(default_sequence_lengths(sequence_length))
    names = inference.onnx_input_names(deployment / "model.onnx")
    rows = encode_each(AutoTokenizer.from_pretrained(deployment), examples, names, lambda n: bucket_of(n, buckets))
    runners = {n: Runner(reference, model_dir, deployment, 1, n) for n in buckets}
    try:
        return np.concatenate([runners[row["input_ids"].shape[1]](row) for row in rows])
    finally:
        for runner in runners.values():
            runner.close()


def served_parity(task: glue.GlueTask, model_dir: Path, deployment: Path, dev_sets: dict[str, list[dict]],
                  thresholds: dict, sequence_length: int, engines=None, request_size: int = 16,
                  progress=print, reference: str = "pytorch") -> dict:
    """Start the server on each engine (default: every one that serves), send it every dev row,
    compare with the answers of ``reference``: the PyTorch checkpoint, or ("engine") the served
    engine itself run directly on the same graph and buckets."""
    from transformers import AutoConfig

    from sparsebert.deploy.local import local_server

    config = AutoConfig.from_pretrained(deployment)
    tolerance = thresholds["max_served_score_difference"]

    def expected_for(engine: str) -> dict:
        out = {}
        for split, examples in dev_sets.items():
            logits = reference_logits(engine if reference == "engine" else reference, model_dir, deployment,
                                      examples, sequence_length)
            out[split] = (inference.answers(logits, config), probability_margins(logits))
        return out

    shared = expected_for("pytorch") if reference == "pytorch" else None
    results = {}
    for engine in (engines if engines is not None else served_engines(int8=checkpoint.is_quantized(model_dir))):
        with tempfile.TemporaryDirectory(prefix="sparsebert-served-") as workdir, \
                local_server(deployment, engine, Path(workdir)) as client:
            expected = shared or expected_for(engine)
            for split, examples in dev_sets.items():
                answers = ask_server(client, examples, request_size)
                compared = compare_answers(expected[split][0], answers, expected[split][1], tolerance)
                compared["pytorch_metric"] = glue.score_answers(task, *expected[split][0], examples)[task.main_metric]
                compared["metric"] = (glue.score_answers(task, *answers, examples)[task.main_metric]
                                      if len(answers[0]) == len(examples) else float("nan"))
                results.setdefault(split, {})[engine] = compared
                progress(f"  served {engine:18} {split}: {compared['answers']} answers, "
                         f"{compared['label_mismatches']} wrong labels, max |Δ score| "
                         f"{compared['max_score_difference']:.1e}")
    return {"task": task.name, "main_metric": task.main_metric, "sequence_length": sequence_length,
            "model": str(model_dir), "deployment": str(deployment), "request_size": request_size,
            "reference": reference, "splits": results, "tolerance": tolerance,
            "passed": all(r["passed"] for split in results.values() for r in split.values())}


# ---------------------------------------------------------------- reports


def table(report: dict) -> str:
    metric = report["main_metric"]
    lines = []
    for split, result in report["splits"].items():
        lines += [f"{report['task']} {split} ({result['examples']} examples, seq {report['sequence_length']}), {metric}:",
                  f"  {'engine':18} {metric:>10} {'|Δ metric|':>11} {'max |Δ logit|':>14}"]
        for engine, metrics in result["metrics"].items():
            against = result["against_pytorch"].get(engine)
            diffs = (f"{against['metric_difference']:11.3f} {against['max_logit_difference']:14.2e}"
                     if against else f"{'-':>11} {'-':>14}")
            lines.append(f"  {engine:18} {metrics[metric]:10.2f} {diffs}")
    lines.append(f"  parity {'PASSED' if report['passed'] else 'FAILED'} (thresholds: "
                 f"{report['thresholds']['max_metric_difference']} points, "
                 f"{report['thresholds']['max_logit_difference']:.0e} in logits)")
    return "\n".join(lines)


def served_table(report: dict) -> str:
    metric = report["main_metric"]
    reference = {"pytorch": "the PyTorch checkpoint's", "engine": "the same engine's, run directly on the same graph"}[
        report.get("reference", "pytorch")]
    lines = [f"{report['task']}: the server's answers over HTTP vs {reference} "
             f"(seq {report['sequence_length']}, {report['request_size']} rows per request):",
             f"  {'split':16} {'engine':18} {'answers':>8} {'wrong labels':>13} {'max |Δ score|':>14} "
             f"{'served ' + metric:>14} {'reference':>9}"]
    for split, engines in report["splits"].items():
        for engine, r in engines.items():
            lines.append(f"  {split:16} {engine:18} {r['answers']:8d} {str(r['label_mismatches']):>13} "
                         f"{r['max_score_difference']:14.1e} {r['metric']:14.2f} {r['pytorch_metric']:9.2f}")
    lines.append(f"  served parity {'PASSED' if report['passed'] else 'FAILED'} "
                 f"(scores within {report['tolerance']:.0e}, labels equal but for ties)")
    return "\n".join(lines)


def write(report: dict, path: Path) -> None:
    atomic.write_json(path, report, indent=2)
