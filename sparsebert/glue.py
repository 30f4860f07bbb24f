"""GLUE tasks: reading the classic ``glue_data`` folders (or the hub) and their official metrics.

Every example becomes ``{"sentence1": str, "sentence2": str (pair tasks), "label": name | float}``
so that label *names* travel with the data and end up in the model's ``id2label``.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsebert.errors import UserError


class DataError(UserError):
    """A task, folder or file that cannot be read as GLUE data."""


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str
    text_columns: tuple[str, ...]  # column names in the TSV header (or indices if no header)
    label_column: str | int
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    has_header: bool = True
    dev_files: tuple[str, ...] = ("dev.tsv",)
    label_map: dict | None = None  # raw TSV value -> label name

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


_BINARY = {"0": 0, "1": 1}
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", (3,), 1, ("unacceptable", "acceptable"), ("matthews",), has_header=False),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"), ("f1", "accuracy")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson_spearman", "pearson", "spearman")),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"), ("accuracy",),
                 dev_files=("dev_matched.tsv", "dev_mismatched.tsv")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), ("accuracy",)),
    ]
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def get_task(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


def split_names(task: GlueTask) -> list[str]:
    """``train`` plus the dev splits: ``dev`` (or ``dev_matched``/``dev_mismatched`` for MNLI)."""
    return ["train"] + dev_splits(task)


def dev_splits(task: GlueTask) -> list[str]:
    """The dev splits, the main one (the one reported first, and SparseML's validation file) first."""
    return [Path(f).stem for f in task.dev_files]


def _label_of(task: GlueTask, raw: str, where: str):
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
    if raw in task.labels:
        return raw
    if raw in _BINARY and len(task.labels) == 2:
        return task.labels[_BINARY[raw]]
    raise DataError(f"{where}: label {raw!r} is not one of {list(task.labels)}")


def read_tsv(task: GlueTask, path: Path) -> list[dict]:
    """Read one GLUE TSV file into examples; any malformed row is a :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"missing GLUE file: {path}")
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:  # MRPC starts with a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.has_header:
        if not rows:
            raise DataError(f"{path}: empty file")
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
        if missing:
            raise DataError(f"{path}: header lacks column(s) {missing}; is this {task.folder}?")
        text_idx = [header.index(c) for c in task.text_columns]
        label_idx = header.index(task.label_column) if task.label_column != "score" else len(header) - 1
    else:
        text_idx, label_idx = list(task.text_columns), task.label_column
    width = max(text_idx + [label_idx]) + 1
    examples = []
    for line_no, row in enumerate(rows, start=2 if task.has_header else 1):
        if not row:
            continue
        where = f"{path}:{line_no}"
        if len(row) < width:
            raise DataError(f"{where}: expected at least {width} tab-separated columns, got {len(row)}")
        example = {f"sentence{i + 1}": row[j] for i, j in enumerate(text_idx)}
        example["label"] = _label_of(task, row[label_idx], where)
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_from_folder(task: GlueTask, glue_dir: str | os.PathLike) -> dict[str, list[dict]]:
    folder = Path(glue_dir) / task.folder
    if not folder.is_dir():
        raise DataError(f"no {task.folder}/ folder in GLUE directory {glue_dir}")
    files = {"train": "train.tsv", **{Path(f).stem: f for f in task.dev_files}}
    return {split: read_tsv(task, folder / name) for split, name in files.items()}


def load_from_hub(task: GlueTask) -> dict[str, list[dict]]:
    """The ``glue`` data set from the Hugging Face hub (only when no local folder was given)."""
    import datasets

    hub = datasets.load_dataset("glue", task.name)
    keys = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
            "dev_mismatched": "validation_mismatched"}
    text_keys = {"cola": ["sentence"], "sst2": ["sentence"], "qqp": ["question1", "question2"],
                 "qnli": ["question", "sentence"]}.get(task.name, ["sentence1", "sentence2"])
    out = {}
    for split in split_names(task):
        rows = hub[keys[split]]
        names = None if task.is_regression else rows.features["label"].names
        out[split] = [
            {**{f"sentence{i + 1}": r[k] for i, k in enumerate(text_keys)},
             "label": float(r["label"]) if names is None else names[r["label"]]}
            for r in rows
        ]
    return out


def load_task(name: str, glue_dir: str | os.PathLike | None) -> tuple[GlueTask, dict[str, list[dict]]]:
    task = get_task(name)
    if glue_dir is None:
        return task, load_from_hub(task)
    return task, load_from_folder(task, glue_dir)


# ----------------------------------------------------------------------------- metrics

def label_indices(task: GlueTask, names) -> np.ndarray:
    """Label names to indices in the task's own order (so F1/MCC's positive class is index 1)."""
    return np.array([task.labels.index(n) for n in names])


def compute_metrics(task: GlueTask, predictions, references) -> dict[str, float]:
    """The task's official GLUE metrics, in percent (points), computed locally.

    ``predictions`` and ``references`` are label indices in ``task.labels`` order (see
    :func:`label_indices`), or scores for STS-B.
    """
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.shape != refs.shape or preds.size == 0:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be equal, non-empty")
    if task.is_regression:
        from scipy.stats import pearsonr, spearmanr

        pearson = float(pearsonr(preds, refs)[0]) * 100
        spearman = float(spearmanr(preds, refs)[0]) * 100
        return {"pearson_spearman": (pearson + spearman) / 2, "pearson": pearson, "spearman": spearman}
    out = {"accuracy": float((preds == refs).mean()) * 100}
    if "f1" in task.metrics:
        out["f1"] = _f1(preds, refs) * 100
    if "matthews" in task.metrics:
        out["matthews"] = _matthews(preds, refs) * 100
    return out


def score(task: GlueTask, logits: np.ndarray, examples: list[dict], id2label: dict) -> dict:
    """Task metrics from logits; class ids go through the model's own ``id2label``."""
    if task.is_regression:
        return compute_metrics(task, logits[:, 0], [e["label"] for e in examples])
    names = [id2label[int(i)] for i in logits.argmax(axis=1)]
    return compute_metrics(task, label_indices(task, names), label_indices(task, [e["label"] for e in examples]))


def score_answers(task: GlueTask, labels: list[str], scores: list[float], examples: list[dict]) -> dict:
    """Task metrics from served answers: label names, or the predicted values of a regression."""
    references = [e["label"] for e in examples]
    if task.is_regression:
        return compute_metrics(task, np.array(scores), references)
    return compute_metrics(task, label_indices(task, labels), label_indices(task, references))


def _f1(preds: np.ndarray, refs: np.ndarray) -> float:
    """F1 of the positive class (index 1), as GLUE reports it for MRPC and QQP."""
    tp = float(np.sum((preds == 1) & (refs == 1)))
    fp = float(np.sum((preds == 1) & (refs != 1)))
    fn = float(np.sum((preds != 1) & (refs == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _matthews(preds: np.ndarray, refs: np.ndarray) -> float:
    tp = float(np.sum((preds == 1) & (refs == 1)))
    tn = float(np.sum((preds == 0) & (refs == 0)))
    fp = float(np.sum((preds == 1) & (refs == 0)))
    fn = float(np.sum((preds == 0) & (refs == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom
