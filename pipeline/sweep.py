"""The accuracy frontier: a grid of (task x sparsity x variant) training runs that resumes where
it stopped, and a page (markdown + PNG) of each task's metric against sparsity.

    sparsebert sweep --tasks mrpc stsb sst2 --sparsities 0.8 0.9 0.95 --variants base aug4 --out runs/sweep

Every cell is its own run folder (``<out>/<task>/<variant>-<sparsity>/``); a cell whose
``metrics.json`` exists is kept, so a sweep interrupted (2 CPU cores: tens of hours) is resumed by
running the same command again. Each task's teacher is fine-tuned once, by its first cell, and
reused by every other; augmented data is made once per task and setting (``<out>/<task>/augment``,
keyed by its inputs). Flags after ``--`` go to every `sparsebert train` of the sweep; a train
subset (``--limit``) or a shorter schedule (``--student-epochs``) is written beside each cell.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sparsebert import glue
from sparsebert.errors import UserError

# Targets (issue #9): retention of the teacher's main metric, per sparsity.
TARGET_RETENTION = {0.8: 0.98, 0.9: 0.95, 0.95: 0.90}
# Published and independent reference retentions, per sparsity (mean over tasks).
REFERENCES = {
    "plain PyTorch run of the method, no augmentation (MiniLM-L6, SST-2/MRPC/STS-B)": {0.8: 0.956, 0.9: 0.83, 0.95: 0.72},
    "SparseML GMP + distillation, 30 epochs (6-layer BERT, SQuAD)": {0.8: 1.0, 0.9: 0.999, 0.95: 0.962},
}
_VARIANT = re.compile(r"^(base|aug(\d+)|obs|global|ptf|ftp)$")


class SweepError(UserError):
    pass


@dataclass(frozen=True)
class Cell:
    task: str
    variant: str
    sparsity: float

    @property
    def name(self) -> str:
        return f"{self.variant}-{round(self.sparsity * 100)}"


def variant_flags(variant: str, sparsity: float = 0.9) -> list[str]:
    """`sparsebert train` flags of a named variant: ``base`` (the recipe's defaults: the
    pre-trained model pruned gradually while distilled), ``augN`` (N teacher-labelled variants per
    example), ``obs`` (second-order pruning), ``global`` (one magnitude ranking over all pruned
    matrices), and the paper's two other orders on the same budget of epochs and the same loss:
    ``ptf`` (prune-then-fine-tune: the pre-trained model pruned to the target at once, then
    trained) and ``ftp`` (fine-tune-then-prune: the student starts from the fine-tuned teacher)."""
    match = _VARIANT.match(variant)
    if not match:
        raise SweepError(f"unknown variant {variant!r}; use base, augN (e.g. aug4), obs, global, ptf or ftp")
    if match.group(2):
        return ["--augment", match.group(2)]
    at_once = json.dumps({"init_sparsity": sparsity, "prune_end_fraction": 0.05, "mask_updates": 1})
    return {"base": [], "obs": ["--recipe", "sparsebert-obs"],
            "global": ["--recipe-args", '{"global_ranking": true}'],
            "ptf": ["--recipe-args", at_once], "ftp": ["--student-init", "teacher"]}[variant]


def run_cell(cell: Cell, out: Path, teacher: Path | None, extra: list[str], train) -> dict:
    """The cell's metrics: read back when it finished before, else trained now."""
    folder = out / cell.task / cell.name
    if not (folder / "metrics.json").is_file():
        print(f"[sweep] {cell.task} {cell.name}: training -> {folder}", flush=True)
        flags = variant_flags(cell.variant, cell.sparsity)
        if "--augment" in flags:  # one augmented set per task and setting, shared by its cells
            flags += ["--augment-cache", str(out / cell.task / "augment")]
        args = ["train", "--task", cell.task, "--sparsity", str(cell.sparsity), "--out", str(folder),
                "--overwrite", *flags, *extra]
        started = time.time()
        code = train(args + (["--teacher", str(teacher)] if teacher else []))
        if code != 0:
            raise SweepError(f"{cell.task} {cell.name} failed (exit {code}); see its output above. "
                             "Finished cells are kept: run the same command to resume")
        print(f"[sweep] {cell.task} {cell.name}: {(time.time() - started) / 60:.1f} min", flush=True)
    return json.loads((folder / "metrics.json").read_text())


def sweep(tasks: list[str], sparsities: list[float], variants: list[str], out: Path, extra: list[str],
          train=None) -> list[dict]:
    """Run every missing cell, task by task (teacher first), and return one row per cell."""
    if train is None:
        from sparsebert.cli import main as train
    for variant in variants:
        variant_flags(variant)  # refuse a bad variant before anything runs
    rows = []
    for task in [glue.get_task(t).name for t in tasks]:
        teacher = None
        for variant in variants:
            for sparsity in sparsities:
                metrics = run_cell(Cell(task, variant, sparsity), out, teacher, extra, train)
                teacher = teacher or Path(metrics["teacher"]["path"])
                rows.append(row(metrics, variant, sparsity, extra))
        write(rows, out)
    return rows


def row(metrics: dict, variant: str, sparsity: float, extra: list[str]) -> dict:
    task = glue.get_task(metrics["task"])
    split, metric = glue.dev_splits(task)[0], task.main_metric
    teacher, student = metrics["teacher"]["dev"][split][metric], metrics["student"]["dev"][split][metric]
    retention = student / teacher if teacher else 0.0
    target = TARGET_RETENTION.get(round(sparsity, 2))
    notes = [f"train subset of {metrics['data']['splits']['train']['examples']:,}" if "--limit" in extra else "",
             f"{metrics['config']['student']['epochs']:g} student epochs" if "--student-epochs" in extra else ""]
    return {"task": task.name, "metric": metric, "variant": variant, "sparsity": sparsity,
            "measured_sparsity": metrics["student"]["encoder_linear_sparsity"],
            "baseline": metrics["baseline"][split][metric], "teacher": teacher, "student": student,
            "retention": retention, "target_retention": target,
            "target_met": None if target is None else retention >= target,
            "beats_baseline": metrics["student_beats_baseline"],
            "student_minutes": metrics["wall_seconds"]["student"] / 60,
            "machine": f"{metrics['machine'].get('device', '')} / {metrics['machine'].get('cpu', '')}".strip(" /"),
            "notes": ", ".join(n for n in notes if n)}


def markdown(rows: list[dict]) -> str:
    lines = ["| task | variant | sparsity (measured) | metric | baseline | teacher | student | kept | target | "
             "beats baseline | student min | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = ("-" if r["target_retention"] is None else
                  f"{r['target_retention']:.0%} " + ("met" if r["target_met"] else
                                                     f"(short by {(r['target_retention'] - r['retention']) * 100:.1f} pts)"))
        lines.append(f"| {r['task']} | {r['variant']} | {r['measured_sparsity']:.2%} | {r['metric']} | "
                     f"{r['baseline']:.2f} | {r['teacher']:.2f} | {r['student']:.2f} | {r['retention']:.1%} | "
                     f"{target} | {'yes' if r['beats_baseline'] else 'no'} | {r['student_minutes']:.1f} | "
                     f"{r['notes']} |")
    machines = sorted({r["machine"] for r in rows})
    lines += ["", f"Final model's dev metric (main metric), sparsity read from the saved weights. "
                  f"Machine(s): {'; '.join(machines)}.", "", "Reference retentions drawn on the plot:"]
    lines += [f"- {name}: " + ", ".join(f"{s:.0%} -> {k:.1%}" for s, k in points.items())
              for name, points in REFERENCES.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = [r for r in rows if r["task"] == task]
        teacher, baseline = cells[0]["teacher"], cells[0]["baseline"]
        for variant in dict.fromkeys(r["variant"] for r in cells):
            points = sorted((r["measured_sparsity"], r["student"]) for r in cells if r["variant"] == variant)
            ax.plot([p[0] * 100 for p in points], [p[1] for p in points], "o-", label=f"student ({variant})")
        ax.axhline(teacher, color="k", linestyle="--", label="dense teacher")
        ax.axhline(baseline, color="grey", linestyle=":", label="majority / constant baseline")
        for (name, points), marker in zip(REFERENCES.items(), "sx"):
            ax.plot([s * 100 for s in points], [k * teacher for k in points.values()], marker, color="tab:red",
                    alpha=0.6, label=f"reference x teacher: {name[:28]}...")
        ax.set_title(f"{task} ({cells[0]['metric']})")
        ax.set_xlabel("encoder-linear sparsity (%)")
        ax.set_ylabel(cells[0]["metric"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(rows, indent=2))
    (out / "frontier.md").write_text("# Accuracy frontier\n\n![frontier](frontier.png)\n\n" + markdown(rows))
    plot(rows, out / "frontier.png")
