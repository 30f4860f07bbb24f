"""The training stage on real GLUE tasks at several sparsities: the dense teacher, the majority
baseline and the sparse students side by side (the README's accuracy table).

    python benchmarks/train_stage.py --tasks mrpc stsb rte --sparsities 0.8 0.9 0.95 --out runs/grid
    python benchmarks/train_stage.py --tasks sst2 --out runs/grid -- --limit 20000 --student-epochs 3

Each task's teacher is fine-tuned once (in the first sparsity's run) and reused by the others;
every cell is its own run folder (<out>/<task>-<sparsity>/), and a cell whose metrics.json exists
is kept, so an interrupted grid resumes. Flags after ``--`` go to every `sparsebert train`.
Figures are the final model's dev metrics; sparsity is read from the saved student weights.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from sparsebert import glue
from sparsebert.cli import main as sparsebert


def cell(task: str, sparsity: float, out: Path, teacher: Path | None, extra: list[str]) -> dict:
    folder = out / f"{task}-{round(sparsity * 100)}"
    if not (folder / "metrics.json").is_file():
        started = time.time()
        args = ["train", "--task", task, "--sparsity", str(sparsity), "--out", str(folder), "--overwrite", *extra]
        code = sparsebert(args + (["--teacher", str(teacher)] if teacher else []))
        if code != 0:
            sys.exit(code)
        print(f"[grid] {folder}: {(time.time() - started) / 60:.1f} min", flush=True)
    return json.loads((folder / "metrics.json").read_text())


def row(metrics: dict) -> dict:
    dev = glue.dev_splits(glue.get_task(metrics["task"]))[0]
    metric = metrics["main_metric"]
    second = next((k for k in metrics["teacher"]["dev"][dev] if k != metric), None)
    pick = lambda scores: {k: scores[k] for k in (metric, second) if k}  # noqa: E731
    return {"task": metrics["task"], "metric": metric, "baseline": pick(metrics["baseline"][dev]),
            "teacher": pick(metrics["teacher"]["dev"][dev]), "student": pick(metrics["student"]["dev"][dev]),
            "sparsity": metrics["student"]["encoder_linear_sparsity"], "retention": metrics["retention"],
            "beats_baseline": metrics["student_beats_baseline"], "precision": metrics["config"]["student"]["precision"],
            "student_epochs": metrics["config"]["student"]["epochs"], "train_examples": metrics["data"]["splits"]["train"]["examples"],
            "student_minutes": metrics["wall_seconds"]["student"] / 60, "machine": metrics["machine"]}


def fmt(scores: dict) -> str:
    values = list(scores.values())
    return f"{values[0]:.2f}" + (f" ({values[1]:.2f})" if len(values) > 1 else "")


def markdown(rows: list[dict]) -> str:
    lines = ["| task | metric | majority baseline | dense teacher | sparsity (measured) | sparse student | kept | beats baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {fmt(r['baseline'])} | {fmt(r['teacher'])} | {r['sparsity']:.2%} | "
                     f"{fmt(r['student'])} | {r['retention']:.1%} | {'yes' if r['beats_baseline'] else 'no'} |")
    machine = rows[0]["machine"]
    lines.append(f"\nMachine: {machine['device']} / {machine['cpu']}; precision {rows[0]['precision']}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "stsb", "rte"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--out", type=Path, default=Path("runs/grid"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    rows = []
    for task in args.tasks:
        teacher = None
        for sparsity in args.sparsities:
            metrics = cell(task, sparsity, args.out, teacher, extra)
            teacher = teacher or Path(metrics["teacher"]["path"])
            rows.append(row(metrics))
    table = markdown(rows)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid.md").write_text(table + "\n")
    (args.out / "grid.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
