"""Data stage: a GLUE task written as JSON-lines files that SparseML's training script reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sparsebert import atomic, glue


def write_jsonl(examples: list[dict], path: Path) -> None:
    with atomic.open_for_writing(path, encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare(task_name: str, glue_dir: str | None, out_dir: Path, limit: int | None = None,
            seed: int = 42) -> dict:
    """Write ``train.json`` and the dev split(s) to ``out_dir``; return a description of them.

    ``limit`` keeps a random subset of that many training examples (and dev examples), for
    smoke runs; the full sets are used when it is None.
    """
    task, splits = glue.load_task(task_name, glue_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, examples in splits.items():
        if limit is not None and len(examples) > limit:
            examples = random.Random(seed).sample(examples, limit)
        path = out_dir / f"{split}.json"
        write_jsonl(examples, path)
        files[split] = {"path": str(path), "examples": len(examples)}
    info = {
        "task": task.name,
        "source": str(Path(glue_dir).resolve()) if glue_dir else "huggingface hub: glue",
        "text_columns": [f"sentence{i + 1}" for i in range(len(task.text_columns))],
        "labels": list(task.labels) if task.labels else None,
        "splits": files,
    }
    atomic.write_json(out_dir / "data.json", info, indent=2)
    return info


def teacher_subset(info: dict, out_dir: Path, limit: int | None, seed: int = 42) -> dict:
    """The data the teacher fine-tunes on: ``info`` itself, or with ``limit`` a random subset of
    its training examples (``teacher-train.json``, recorded in ``data.json`` as ``teacher_train``,
    beside the splits: every split but train is a dev split to the later stages), drawn as
    ``prepare``'s ``limit`` draws it, so a teacher on ``--teacher-limit N`` of the full set sees
    what one on ``--limit N`` saw. The student still distils on every example: it learns from the
    teacher's answers, not the labels, so text the teacher never trained on teaches it too."""
    train = info["splits"]["train"]
    if limit is None or train["examples"] <= limit:
        return info
    examples = random.Random(seed).sample(read_jsonl(Path(train["path"])), limit)
    path = out_dir / "teacher-train.json"
    write_jsonl(examples, path)
    info["teacher_train"] = {"path": str(path), "examples": limit}
    atomic.write_json(out_dir / "data.json", info, indent=2)
    return {**info, "splits": {**info["splits"], "train": info["teacher_train"]}}
