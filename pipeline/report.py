"""What a trained checkpoint is: its dev metrics, the sparsity measured in its saved weights,
its parameter counts and its encoder FLOPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsebert import glue
from sparsebert.checkpoint import is_pruned


def kept_weights_moved(weights: dict[str, np.ndarray], pretrained: dict[str, np.ndarray],
                       patterns: list[str]) -> float | None:
    """Fraction of the kept (non-zero) weights of the pruned matrices that differ from the
    pre-trained model's: 0 for a student that was pruned but never trained; None when no
    matrix could be compared."""
    from sparsebert.families import PREFIXES

    moved = kept = 0
    for name, weight in weights.items():
        # A pre-trained base model saves its weights without the task model's prefix (bert., roberta., ...).
        prefix, _, headless = name.partition(".")
        before = pretrained.get(name, pretrained.get(headless) if prefix in PREFIXES else None)
        if before is None or before.shape != weight.shape or not is_pruned(name, patterns):
            continue
        mask = weight != 0
        kept += int(mask.sum())
        moved += int((weight[mask] != before[mask]).sum())
    return moved / kept if kept else None


def evaluate(task: glue.GlueTask, model_dir: Path, dev_sets: dict[str, list[dict]],
             max_seq_length: int = 128) -> dict:
    """Dev metrics of the saved (final) model on every dev split of the task."""
    from transformers import AutoConfig

    from sparsebert.inference import torch_logits

    id2label = {int(k): v for k, v in AutoConfig.from_pretrained(model_dir).id2label.items()}
    return {split: glue.score(task, torch_logits(model_dir, examples, max_seq_length), examples, id2label)
            for split, examples in dev_sets.items()}


def majority_baseline(task: glue.GlueTask, train: list[dict], dev_sets: dict[str, list[dict]]) -> dict:
    """Every metric of the trivial model on each dev split: the training set's most frequent
    label for every example (an all-"equivalent" MRPC guess scores F1 81.2, accuracy 68.4), or a
    constant score for regression, which has no correlation (0)."""
    if task.is_regression:
        return {split: {m: 0.0 for m in task.metrics} for split in dev_sets}
    labels = [e["label"] for e in train]
    majority = max(task.labels, key=labels.count)
    return {split: {**glue.compute_metrics(task, glue.label_indices(task, [majority] * len(examples)),
                                           glue.label_indices(task, [e["label"] for e in examples])),
                    "label": majority}
            for split, examples in dev_sets.items()}
