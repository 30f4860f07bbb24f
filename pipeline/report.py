"""What a trained checkpoint is: its dev metrics, the sparsity measured in its saved weights,
its parameter counts and its encoder FLOPs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sparsebert import glue
from sparsebert.checkpoint import is_pruned
from sparsebert.errors import UserError


def sparsity_report(weights: dict[str, np.ndarray], patterns: list[str]) -> dict:
    """Per-matrix and overall zero fraction of the recipe's pruned matrices, and parameter counts."""
    per_matrix = {n: float((w == 0).mean()) for n, w in weights.items() if is_pruned(n, patterns)}
    if not per_matrix:
        raise UserError(f"the recipe's pruned params {patterns} match no weight of the checkpoint")
    prunable = sum(weights[n].size for n in per_matrix)
    zeros = sum(int((weights[n] == 0).sum()) for n in per_matrix)
    total = sum(w.size for w in weights.values())
    return {
        "encoder_linear_sparsity": zeros / prunable if prunable else 0.0,
        "per_matrix_sparsity": per_matrix,
        "min_matrix_sparsity": min(per_matrix.values()) if per_matrix else 0.0,
        "parameters_total": int(total),
        "parameters_encoder_linears": int(prunable),
        "parameters_nonzero_encoder_linears": int(prunable - zeros),
        "parameters_nonzero_total": int(total - zeros),
    }


def kept_weights_moved(weights: dict[str, np.ndarray], pretrained: dict[str, np.ndarray],
                       patterns: list[str]) -> float | None:
    """Fraction of the kept (non-zero) weights of the pruned matrices that differ from the
    pre-trained model's: 0 for a student that was pruned but never trained; None when no
    matrix could be compared."""
    moved = kept = 0
    for name, weight in weights.items():
        before = pretrained.get(name, pretrained.get(name.removeprefix("bert.")))
        if before is None or before.shape != weight.shape or not is_pruned(name, patterns):
            continue
        mask = weight != 0
        kept += int(mask.sum())
        moved += int((weight[mask] != before[mask]).sum())
    return moved / kept if kept else None


def encoder_flops(weights: dict[str, np.ndarray], patterns: list[str], seq_len: int, hidden_size: int) -> dict:
    """Multiply-adds x2 per sequence of ``seq_len`` tokens: the encoder linears (dense vs. only
    their non-zeros) plus attention's two seq x seq products, which pruning does not touch."""
    linears = {n: w for n, w in weights.items() if is_pruned(n, patterns)}
    dense_linear = 2 * seq_len * sum(w.size for w in linears.values())
    sparse_linear = 2 * seq_len * sum(int(np.count_nonzero(w)) for w in linears.values())
    layers = len({re.search(r"layer\.(\d+)\.", n).group(1) for n in linears})
    attention = layers * 2 * (2 * seq_len * seq_len * hidden_size)
    return {
        "sequence_length": seq_len,
        "dense_encoder_flops": dense_linear + attention,
        "sparse_encoder_flops": sparse_linear + attention,
        "encoder_flops_reduction": (dense_linear + attention) / max(sparse_linear + attention, 1),
        "linear_flops_reduction": dense_linear / max(sparse_linear, 1),
    }


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
