"""The accuracy frontier: a grid of (task x sparsity x variant) training runs that resumes where
it stopped, and a page (markdown + PNG) of each task's metric against sparsity.

    sparsebert sweep --tasks mrpc stsb sst2 --sparsities 0.8 0.9 0.95 --variants base aug4 --out runs/sweep

Every cell is its own run folder (``<out>/<task>/<variant>-<sparsity>/``); a cell whose
``metrics.json`` exists is kept, so a sweep interrupted (2 CPU cores: tens of hours) is resumed by
running the same command again. Each task's teacher is fine-tuned once, by its first cell, and
reused by every other; augmented data is made once per task and setting (``<out>/<task>/augment``,
keyed by its inputs). Flags after ``--`` go to every `sparsebert train` of the sweep (here: the
``TrainRequest`` fields they set, ``settings``); a train subset (``--limit``) or a shorter schedule
(``--student-epochs``) is written beside each cell. Each cell is a ``request.train`` call.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sparsebert import atomic, glue
from sparsebert.errors import UserError

# Targets (issue #9): mean retention of the teacher's main metric over these tasks, per sparsity,
# each task above its baseline (MRPC's all-"equivalent" guess alone keeps 96% of a teacher's F1).
TARGET_RETENTION = {0.8: 0.98, 0.9: 0.95, 0.95: 0.90}
TARGET_TASKS = ("mrpc", "stsb", "sst2")
# Published and independent reference retentions, per sparsity (mean over tasks).
REFERENCES = {
    "plain PyTorch run of the method, no augmentation (MiniLM-L6, SST-2/MRPC/STS-B)": {0.8: 0.956, 0.9: 0.83, 0.95: 0.72},
    "SparseML GMP + distillation, 30 epochs (6-layer BERT, SQuAD)": {0.8: 1.0, 0.9: 0.999, 0.95: 0.962},
}
_VARIANT = re.compile(r"^(base|aug([1-9]\d*)|obs|global|ptf|ftp|small)$")


class SweepError(UserError):
    pass


@dataclass(frozen=True)
class Cell:
    task: str
    variant: str
    sparsity: float

    depth: int = 6  # encoder layers of the pre-trained model

    @property
    def name(self) -> str:
        if self.variant == "small":  # one cell per depth: 90% and 95% may share it
            return f"small-l{small_layers(self.sparsity, self.depth)}"
        return f"{self.variant}-{round(self.sparsity * 100)}"


def small_layers(sparsity: float, depth: int) -> int:
    """Layers of the small dense student nearest in non-zero encoder weights to the model pruned
    to ``sparsity`` (Python's round: halves go to the even number), at least one: at 90% and 95% a
    6-layer model keeps 0.6 and 0.3 layers' worth, so the one-layer student keeps 1.7x and 3.3x
    the sparse one's weights (the page says so beside each comparison)."""
    return max(1, round((1 - sparsity) * depth))


def variant_settings(variant: str, sparsity: float = 0.9, depth: int = 6) -> dict:
    """The ``TrainRequest`` fields of a named variant: ``base`` (the recipe's defaults: the
    pre-trained model pruned gradually while distilled; a task's own schedule,
    ``request.TASK_SCHEDULES``, is not used by the sweep), ``augN`` (N teacher-labelled variants per
    example), ``obs`` (second-order pruning), ``global`` (one magnitude ranking over all pruned
    matrices), and the paper's two other orders on the same budget of epochs and the same loss:
    ``ptf`` (prune-then-fine-tune: the pre-trained model pruned to the target at once, then
    trained) and ``ftp`` (fine-tune-then-prune: the student starts from the fine-tuned teacher);
    ``small``: the paper's other comparison, a dense student of the teacher's width keeping only its
    first layers (``small_layers``), distilled with the same loss and budget, nothing pruned."""
    match = _VARIANT.match(variant)
    if not match:
        raise SweepError(f"unknown variant {variant!r}; use base, augN (e.g. aug4), obs, global, ptf, ftp or small")
    if match.group(2):
        return {"augment": int(match.group(2))}
    if variant == "small":
        return {"student_layers": small_layers(sparsity, depth), "recipe": "distill"}
    at_once = {"init_sparsity": sparsity, "prune_end_fraction": 0.05, "mask_updates": 1}
    return {"base": {}, "obs": {"recipe": "sparsebert-obs"}, "global": {"recipe_args": {"global_ranking": True}},
            "ptf": {"recipe_args": at_once}, "ftp": {"student_init": "teacher"}}[variant]


def cell_request(cell: Cell, out: Path, teacher: Path | None, settings: dict):
    """The cell's ``TrainRequest``: the sweep's settings, the variant's, its sparsity and folder."""
    from sparsebert.pipeline.request import TrainRequest

    variant = variant_settings(cell.variant, cell.sparsity, cell.depth)
    if "augment" in variant:  # one augmented set per task and setting, shared by its cells
        variant["augment_cache"] = out / cell.task / "augment"
    elif "augment" not in settings:
        # Every variant on the recipe's schedule, so the grid compares what the variants change
        # alone (a task's own default schedule, request.TASK_SCHEDULES, would reach only some).
        variant["augment"] = 0
    user_args, variant_args = settings.get("recipe_args", {}), variant.get("recipe_args", {})
    clashes = sorted(k for k in set(settings) & set(variant) if k != "recipe_args" and settings[k] != variant[k])
    clashes += sorted(k for k in set(user_args) & set(variant_args) if user_args[k] != variant_args[k])
    if clashes:
        raise SweepError(f"the {cell.variant} variant sets {', '.join(clashes)} itself; leave it out of the "
                         "flags for every cell")
    fields = {**settings, **variant, "recipe_args": {**user_args, **variant_args}}
    fields["teacher"] = str(teacher) if teacher else settings.get("teacher")  # a given teacher serves the first cell
    if fields["teacher"]:  # trained (on --teacher-limit's subset, if given) by the first cell
        fields.pop("teacher_limit", None)
    if cell.variant != "small":  # distill.yaml prunes nothing
        fields["sparsity"] = cell.sparsity
    folder = out / cell.task / cell.name
    # A cell a stopped sweep left half-trained goes on from its last checkpoint.
    from sparsebert.pipeline.stage import stopped_runs

    return TrainRequest(task=cell.task, out=folder, overwrite=True, resume=bool(stopped_runs(folder)), **fields)


def run_cell(cell: Cell, out: Path, teacher: Path | None, settings: dict, train) -> dict:
    """The cell's metrics: read back when it finished before, else trained now (going on with
    what a stopped sweep left of it, when that was asked the same)."""
    from sparsebert.pipeline.stage import ResumeRefused

    folder = out / cell.task / cell.name
    if not (folder / "metrics.json").is_file():
        print(f"[sweep] {cell.task} {cell.name}: training -> {folder}", flush=True)
        started = time.time()
        request = cell_request(cell, out, teacher, settings)
        try:
            try:
                metrics = train(request)
            except ResumeRefused as error:  # the stopped run was asked otherwise (the sweep's flags changed)
                print(f"[sweep] {cell.task} {cell.name}: not resumed ({error}); training it again", flush=True)
                metrics = train(replace(request, resume=False))
        except UserError as error:
            raise SweepError(f"{cell.task} {cell.name}: {error}. Finished cells are kept: run the same command "
                             "to resume") from error
        from sparsebert.pipeline.stage import summary

        print(summary(metrics))
        print(f"[sweep] {cell.task} {cell.name}: {(time.time() - started) / 60:.1f} min", flush=True)
    return json.loads((folder / "metrics.json").read_text())


def cell_jobs(tasks: list[str], sparsities: list[float], variants: list[str], out: Path, settings: dict,
              train_flags: list[str]) -> dict[str, list[str]]:
    """The sweep as independent jobs, each a ``sparsebert sweep`` command that resumes where it
    stopped when run again, in three phases: per task, its cells at the first sparsity (they
    fine-tune the teacher and make each variant's augmented data, which every other cell of the
    task reuses); then every other cell (one job per run folder), in any order, at once, each
    given that teacher by path (a job started before it exists stops, instead of fine-tuning a
    teacher of its own); then the page."""
    import shlex

    check_grid(variants, settings)
    tasks = [glue.get_task(t).name for t in tasks]  # the folder names (SST-2 -> sst2)
    out = Path(out).resolve()  # the jobs may start in another folder
    train_flags = _absolute_paths(train_flags)
    depth = model_depth(settings) if "small" in variants else 6

    def command(task: list[str], sparsity: list[float], variant: list[str], *extra: str, flags=train_flags) -> str:
        words = ["sparsebert", "sweep", "--tasks", *task, "--sparsities", *map(str, sparsity), "--variants", *variant,
                 "--out", str(out), *extra]
        return shlex.join(words + (["--", *flags] if flags else []))

    first, later = sparsities[0], []
    folders = {(t, Cell(t, v, first, depth).name) for t in tasks for v in variants}  # phase 1's
    for task in tasks:
        teacher = finished_teacher(out / task) or out / task / Cell(task, variants[0], first, depth).name / "teacher"
        flags = train_flags if "teacher" in settings else [*train_flags, "--teacher", str(teacher)]
        for variant in variants:
            for sparsity in sparsities[1:]:
                cell = Cell(task, variant, sparsity, depth)
                if (task, cell.name) not in folders:  # small: two sparsities may share one run folder
                    folders.add((task, cell.name))
                    later.append(command([task], [sparsity], [variant], flags=flags))
    return {
        "1. per task, the cells that make what the others reuse": [command([t], [first], variants) for t in tasks],
        "2. every other cell, one job each": later,
        "3. the frontier page, once they finished": [command(tasks, sparsities, variants, "--page-only")],
    }


# Train flags naming a file or folder: printed absolute, for jobs that start in another folder.
_PATH_FLAGS = ("--glue-dir", "--model", "--recipe", "--teacher", "--augment-cache", "--int8-recipe")


def _absolute_paths(flags: list[str]) -> list[str]:
    resolved = list(flags)
    for i, flag in enumerate(flags):
        name, given, value = flag.partition("=")
        if name not in _PATH_FLAGS:
            continue
        if given and Path(value).exists():
            resolved[i] = f"{name}={Path(value).resolve()}"
        elif not given and i + 1 < len(flags) and Path(flags[i + 1]).exists():
            resolved[i + 1] = str(Path(flags[i + 1]).resolve())
    return resolved


def check_grid(variants: list[str], settings: dict) -> None:
    """Refuse a bad variant, or a flag for every cell that the grid sets per cell, before anything runs."""
    for variant in variants:
        variant_settings(variant)
    fixed = {"sparsity", "out", "task", "overwrite"} | ({"recipe", "student_layers"} if "small" in variants else set())
    given = sorted(fixed & set(settings))
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise SweepError(f"{flags} cannot be a flag for every cell of this sweep: the grid sets it per cell")


def sweep(tasks: list[str], sparsities: list[float], variants: list[str], out: Path, settings: dict,
          train=None, page_only: bool = False) -> list[dict]:
    """Run every missing cell, task by task (teacher first), and return one row per cell; with
    ``page_only``, train nothing and write the page of the cells finished so far. ``settings``:
    ``TrainRequest`` fields for every cell; ``train``: what trains a request (``request.train``)."""
    if train is None:
        from sparsebert.pipeline.request import train
    check_grid(variants, settings)
    depth = model_depth(settings) if "small" in variants else 6
    rows, missing = [], []
    for task in [glue.get_task(t).name for t in tasks]:
        teacher = finished_teacher(out / task)
        for variant in variants:
            for sparsity in sparsities:
                cell = Cell(task, variant, sparsity, depth)
                if page_only and not (out / task / cell.name / "metrics.json").is_file():
                    missing.append(cell)
                    continue
                metrics = run_cell(cell, out, teacher, settings, train)
                teacher = teacher or Path(metrics["teacher"]["path"])
                rows.append(row(metrics, variant, sparsity))
        write(rows, out, missing)
    return rows


def finished_teacher(task_folder: Path) -> Path | None:
    """The teacher an earlier sweep fine-tuned for this task (so a grid extended with new cells
    keeps comparing students of one teacher), or None."""
    for metrics in sorted(task_folder.glob("*/metrics.json")):
        recorded = Path(json.loads(metrics.read_text())["teacher"]["path"])
        # A path recorded relative to where that sweep ran: the cell's own teacher is beside it.
        for teacher in (recorded, metrics.parent / "teacher"):
            if (teacher / "config.json").is_file():
                return teacher.resolve()
    return None


def model_depth(settings: dict) -> int:
    """Encoder layers of the pre-trained model the sweep's cells start from (``model``)."""
    from transformers import AutoConfig

    from sparsebert import models

    name = settings.get("model", models.DEFAULT_MODEL)
    return AutoConfig.from_pretrained(models.resolve_model(name)).num_hidden_layers


def margin_share(student: float, teacher: float, baseline: float) -> float | None:
    """The share of the teacher's margin over the baseline that the student keeps: what it
    learned (on MRPC's F1 the constant guess alone 'keeps' 96% of the teacher); None when the
    teacher is no better than the baseline."""
    return (student - baseline) / (teacher - baseline) if teacher > baseline else None


def row(metrics: dict, variant: str, sparsity: float) -> dict:
    task = glue.get_task(metrics["task"])
    split, metric = glue.dev_splits(task)[0], task.main_metric
    teacher, student = metrics["teacher"]["dev"][split][metric], metrics["student"]["dev"][split][metric]
    nonzero = metrics["student"]["parameters_nonzero_encoder_linears"]
    retention = student / teacher if teacher else 0.0
    target = None if variant == "small" else TARGET_RETENTION.get(round(sparsity, 2))
    return {"task": task.name, "metric": metric, "variant": variant, "sparsity": sparsity,
            "measured_sparsity": metrics["student"]["encoder_linear_sparsity"],
            "student_layers": metrics.get("student_layers"),
            "nonzero_encoder_linears": nonzero,
            # 1 - the student's non-zero encoder-linear weights over the teacher's encoder linears:
            # the measured sparsity for a pruned student, the weights left out for a small one.
            "equivalent_sparsity": 1 - nonzero / metrics["teacher"]["parameters_encoder_linears"],
            "baseline": metrics["baseline"][split][metric], "teacher": teacher, "student": student,
            "retention": retention, "target_retention": target,
            "margin_kept": margin_share(student, teacher, metrics["baseline"][split][metric]),
            "target_met": None if target is None else retention >= target and metrics["student_beats_baseline"],
            "beats_baseline": metrics["student_beats_baseline"],
            "student_minutes": metrics["wall_seconds"]["student"] / 60,
            # Read from the cell itself, so cells run with a train subset (--limit) or a shorter
            # schedule say so beside their figures whichever sweep wrote them.
            "train_examples": metrics["data"]["splits"]["train"]["examples"],
            "augmented_examples": (metrics.get("augmentation") or {}).get("student_train_examples"),
            "student_epochs": metrics["config"]["student"]["epochs"],
            "student_lr": metrics["config"]["student"]["learning_rate"],
            "seed": metrics["config"]["student"]["seed"],
            "machine": machine(metrics["machine"])}


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _given(value) -> str:
    """A figure an older page's rows may lack (they were written before it was recorded)."""
    return "-" if value is None else f"{value:g}"


def machine(described: dict) -> str:
    """Where a cell trained: the GPU when there was one, else the CPU, its core count and, when the
    run used fewer, the threads it trained on."""
    if described.get("device") not in (None, "", "cpu"):
        return described["device"]
    cores, threads = described.get("physical_cores", "?"), described.get("torch_threads")
    pinned = isinstance(cores, int) and threads and threads < cores  # its minutes are not the machine's
    return f"{described.get('cpu', 'CPU')} ({cores} core{'' if cores == 1 else 's'}{f', {threads} used' if pinned else ''})"


def markdown(rows: list[dict]) -> str:
    lines = ["| task | variant | sparsity (measured) | metric | baseline | teacher | student | kept | margin kept | "
             "target | beats baseline | train examples | epochs | student lr | seed | student min | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shown = set()
    for r in rows:
        if r["variant"] == "small":  # one small cell serves several sparsities: shown once
            if (r["task"], r["student_layers"]) in shown:
                continue
            shown.add((r["task"], r["student_layers"]))
        target = ("-" if r["target_retention"] is None else f"{r['target_retention']:.0%} " + (
            "met" if r["target_met"] else "not met: below the baseline" if not r["beats_baseline"]
            else f"(short by {(r['target_retention'] - r['retention']) * 100:.1f} pts)"))
        sparsity = (f"dense, {r['student_layers']} layer(s): {r['equivalent_sparsity']:.2%} of the weights left out"
                    if r["variant"] == "small" else f"{r['measured_sparsity']:.2%}")
        lines.append(f"| {r['task']} | {r['variant']} | {sparsity} | {r['metric']} | "
                     f"{r['baseline']:.2f} | {r['teacher']:.2f} | {r['student']:.2f} | {r['retention']:.1%} | "
                     f"{_share(r.get('margin_kept'))} | {target} | {'yes' if r['beats_baseline'] else 'no'} | {examples(r)} | "
                     f"{r['student_epochs']:g} | {_given(r.get('student_lr'))} | {_given(r.get('seed'))} | "
                     f"{r['student_minutes']:.1f} | {r['machine']} |")
    lines += ["", "Final model's dev metric (main metric), sparsity read from the saved weights; kept: the "
                  "student's share of the teacher's metric; margin kept: (student - baseline) / (teacher - baseline), the share of what the teacher learned beyond the baseline that the student keeps (where the teacher is only a few points above the baseline, as MRPC's F1 is, one point of the student moves it by about 30%). Train examples: the teacher's (a subset where smaller "
                  "than the task's train set), + the teacher-labelled variants the student also saw.",
              "", "Reference retentions drawn on the plot:"]
    lines += [f"- {name}: " + ", ".join(f"{s:.0%} -> {k:.1%}" for s, k in points.items())
              for name, points in REFERENCES.items()]
    return "\n".join(lines + mean_retention(rows) + claims(rows)) + "\n"


def mean_retention(rows: list[dict]) -> list[str]:
    """The issue's targets are on the mean retention over the tasks, per variant and sparsity."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["target_retention"] is not None:
            groups.setdefault((r["variant"], r["sparsity"]), []).append(r)
    if not groups:
        return []
    lines = ["", "## Mean retention over the tasks", "", "| variant | sparsity | tasks | mean kept | mean margin kept | "
             "target | tasks not beating their baseline |", "|---|---|---|---|---|---|---|"]
    for (variant, sparsity), cells in groups.items():
        mean = sum(r["retention"] for r in cells) / len(cells)
        margins = [r["margin_kept"] for r in cells if r.get("margin_kept") is not None]
        target, ran = cells[0]["target_retention"], {r["task"] for r in cells}
        losers = ", ".join(r["task"] for r in cells if not r["beats_baseline"]) or "none"
        verdict = (f"not judged: {len(ran & set(TARGET_TASKS))} of the target's {len(TARGET_TASKS)} tasks run"
                   if not set(TARGET_TASKS) <= ran else
                   "met" if mean >= target and losers == "none" else
                   ("not met" if mean >= target else f"short by {(target - mean) * 100:.1f} pts")
                   + (f"; {losers} below the baseline" if losers != "none" else ""))
        margin = _share(sum(margins) / len(margins) if len(margins) == len(cells) else None)
        lines.append(f"| {variant} | {sparsity:.0%} | {', '.join(r['task'] for r in cells)} | {mean:.1%} | {margin} | "
                     f"{target:.0%} {verdict} | {losers} |")
    return lines


def examples(r: dict) -> str:
    extra = (r.get("augmented_examples") or r["train_examples"]) - r["train_examples"]
    return f"{r['train_examples']:,}" + (f" + {extra:,}" if extra else "")


def verdict(sparse: dict, small: dict, weight_ratio: float) -> str:
    """Who wins, and whether the win says anything: a small model that wins while keeping more
    weights does not refute the claim; one that loses with more weights supports it; nothing
    is said by students that do not beat the majority baseline."""
    if not (sparse["beats_baseline"] or small["beats_baseline"]):
        return "neither beats the baseline: says little"
    if sparse["student"] == small["student"]:
        return "tie"
    if sparse["student"] > small["student"]:
        return "sparse" + (" (with fewer weights)" if weight_ratio > 1.05 else "")
    return "small dense" + (" (with more weights: inconclusive)" if weight_ratio > 1.05 else "")


def claims(rows: list[dict]) -> list[str]:
    """The paper's two claims, where the sweep holds the cells to test them: the order of pruning
    and fine-tuning (base against ptf and ftp), and sparse against small dense (base against
    small, with the non-zero encoder weights of each)."""
    cell = {(r["task"], r["variant"], r["sparsity"]): r for r in rows}
    keys = sorted({(r["task"], r["sparsity"]) for r in rows if r["variant"] == "base"})
    lines = []
    order = [k for k in keys if any((*k[:1], v, k[1]) in cell for v in ("ptf", "ftp"))]
    if order:
        lines += ["", "## Claim 1: prune the pre-trained model while distilling (base) vs the other orders", "",
                  "Same loss and epochs; one teacher per task when the cells come from one sweep (the teacher "
                  "column lists each cell's). ptf: prune-then-fine-tune (pruned to the target at once, then "
                  "trained); ftp: fine-tune-then-prune (the student starts from the fine-tuned teacher).", "",
                  "| task | sparsity | metric | teacher(s) | base (paper) | ptf | ftp | best |",
                  "|---|---|---|---|---|---|---|---|"]
        for task, sparsity in order:
            found = {v: cell.get((task, v, sparsity)) for v in ("base", "ptf", "ftp")}
            scores = {v: r["student"] for v, r in found.items() if r}
            best = ", ".join(v for v, score in scores.items() if score == max(scores.values()))
            if not any(r["beats_baseline"] for r in found.values() if r):
                best += " (no student beats the baseline: says little)"
            teachers = " / ".join(dict.fromkeys(f"{r['teacher']:.2f}" for r in found.values() if r))
            lines.append(f"| {task} | {sparsity:.0%} | {found['base']['metric']} | {teachers} | " + " | ".join(
                f"{r['student']:.2f}" if r else "-" for r in found.values()) + f" | {best} |")
    small = [k for k in keys if (k[0], "small", k[1]) in cell]
    if small:
        lines += ["", "## Claim 2: sparse vs small dense, by non-zero encoder weights", "",
                  "Both distilled from the same teacher with the same loss and epochs; small keeps the first "
                  "layers of the pre-trained model, dense (at least one layer, so it may keep more weights than "
                  "the sparse student: the ratio column says how many more).", "",
                  "| task | sparsity | metric | sparse student | its non-zero encoder weights | small dense student | "
                  "its layers and weights | small / sparse weights | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for task, sparsity in small:
            sparse, dense = cell[(task, "base", sparsity)], cell[(task, "small", sparsity)]
            ratio = dense["nonzero_encoder_linears"] / max(sparse["nonzero_encoder_linears"], 1)
            lines.append(f"| {task} | {sparsity:.0%} | {sparse['metric']} | {sparse['student']:.2f} | "
                         f"{sparse['nonzero_encoder_linears']:,} | {dense['student']:.2f} | "
                         f"{dense['student_layers']} layer(s), {dense['nonzero_encoder_linears']:,} | {ratio:.2f}x | "
                         f"{verdict(sparse, dense, ratio)} |")
    return lines


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
            points = sorted((r["equivalent_sparsity"], r["student"]) for r in cells if r["variant"] == variant)
            ax.plot([p[0] * 100 for p in points], [p[1] for p in points], "o-", label=f"student ({variant})")
        ax.axhline(teacher, color="k", linestyle="--", label="dense teacher")
        ax.axhline(baseline, color="grey", linestyle=":", label="majority / constant baseline")
        for (name, points), marker in zip(REFERENCES.items(), "sx"):
            ax.plot([s * 100 for s in points], [k * teacher for k in points.values()], marker, color="tab:red",
                    alpha=0.6, label=f"reference x teacher: {name[:28]}...")
        ax.set_title(f"{task} ({cells[0]['metric']})")
        ax.set_xlabel("encoder-linear sparsity (%; small: weights left out)")
        ax.set_ylabel(cells[0]["metric"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out: Path, missing: list[Cell] = (), note: str = "") -> None:
    """The page: frontier.json, frontier.md (``note`` under its title) and frontier.png."""
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "frontier.json", rows, indent=2)
    names = dict.fromkeys(f"{c.task} {c.name}" for c in missing)  # a shared small cell once
    not_run = ["", "Not run yet: " + ", ".join(names) + "."] if missing else []
    atomic.write_text(out / "frontier.md", "# Accuracy frontier\n\n" + (f"{note}\n\n" if note else "")
                      + "![frontier](frontier.png)\n\n" + markdown(rows) + "\n".join(not_run) + "\n")
    if rows:
        plot(rows, out / "frontier.png")
