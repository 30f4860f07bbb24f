"""Accuracy parity: the task's full dev set through PyTorch, ONNX Runtime and DeepSparse, the
same fixed-length inputs for all three, the task metric for each side by side and the largest
logit difference against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparsebert import glue
from sparsebert.deploy.engines import ENGINES, Runner, encode, run_batched
from sparsebert.pipeline.report import score


def parity(task: glue.GlueTask, model_dir: Path, deployment: Path, examples: list[dict],
           thresholds: dict, batch_size: int = 16, sequence_length: int = 128) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deployment)
    id2label = {int(k): v for k, v in AutoConfig.from_pretrained(deployment).id2label.items()}
    inputs = encode(tokenizer, examples, sequence_length)
    logits, metrics = {}, {}
    for engine in ENGINES:
        runner = Runner(engine, model_dir, deployment, batch_size, sequence_length)
        try:
            logits[engine] = run_batched(runner, inputs)
        finally:
            runner.close()
        metrics[engine] = score(task, logits[engine], examples, id2label)
    metric = task.main_metric
    engines = {}
    for engine in ENGINES[1:]:
        metric_diff = abs(metrics[engine][metric] - metrics["pytorch"][metric])
        logit_diff = float(np.abs(logits[engine] - logits["pytorch"]).max())
        engines[engine] = {
            "metric_difference": metric_diff,
            "max_logit_difference": logit_diff,
            "agreement": float((logits[engine].argmax(1) == logits["pytorch"].argmax(1)).mean())
            if not task.is_regression else None,
            "passed": metric_diff <= thresholds["max_metric_difference"]
            and logit_diff <= thresholds["max_logit_difference"],
        }
    return {
        "task": task.name,
        "main_metric": metric,
        "examples": len(examples),
        "sequence_length": sequence_length,
        "batch_size": batch_size,
        "model": str(model_dir),
        "deployment": str(deployment),
        "metrics": metrics,
        "against_pytorch": engines,
        "thresholds": thresholds,
        "passed": all(e["passed"] for e in engines.values()),
    }


def table(report: dict) -> str:
    metric = report["main_metric"]
    lines = [f"{report['task']} dev ({report['examples']} examples, seq {report['sequence_length']}), {metric}:",
             f"  {'engine':12} {metric:>10} {'|Δ metric|':>11} {'max |Δ logit|':>14}"]
    for engine, metrics in report["metrics"].items():
        against = report["against_pytorch"].get(engine)
        diffs = (f"{against['metric_difference']:11.3f} {against['max_logit_difference']:14.2e}"
                 if against else f"{'-':>11} {'-':>14}")
        lines.append(f"  {engine:12} {metrics[metric]:10.2f} {diffs}")
    lines.append(f"  parity {'PASSED' if report['passed'] else 'FAILED'} (thresholds: "
                 f"{report['thresholds']['max_metric_difference']} points, "
                 f"{report['thresholds']['max_logit_difference']:.0e} in logits)")
    return "\n".join(lines)


def write(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))
