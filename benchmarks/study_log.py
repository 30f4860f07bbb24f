"""The study's results log: one row per trained cell (command, machine, minutes, seed, metric,
sparsity measured in the saved weights, the baseline beside it), written to docs/study/.

    python benchmarks/study_log.py runs/study [--out docs/study] [--previous docs/frontier/h100-2026-11-26/frontier.json]

A cell is any run folder under the given folder that holds a ``metrics.json`` (written by
`sparsebert train`); its ``command.txt``, when present, is the command that trained it. Cells
named ``<screen>-<lever>-<sparsity>[-s<seed>]`` are grouped by screen and lever, and every group
of two or more seeds gets its mean and spread. ``--previous`` adds the rows of an earlier
frontier page (its figures stay beside the new ones). ``--frontier CELL ...`` also writes the
frontier page (docs/frontier/) of the named logged cells: one per task and sparsity.

Rows already in ``<out>/results.json`` whose run folder is no longer under the given folder (an
earlier machine's cells) are kept as they are; a cell found again on disk replaces its old row.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from sparsebert import glue
from sparsebert.pipeline.sweep import TARGET_RETENTION, margin_share, row, write

_SEED_SUFFIX = re.compile(r"-s\d+$")


def cell_row(folder: Path, root: Path) -> dict:
    """One cell: the frontier page's row of it (sweep.row), and what the log adds."""
    metrics = json.loads((folder / "metrics.json").read_text())
    cfg = metrics["config"]["student"]
    cell = row(metrics, folder.name, metrics["student"]["encoder_linear_sparsity"])
    command = folder / "command.txt"
    return {
        "task": cell["task"],
        "cell": str(folder.relative_to(root)),
        "group": _SEED_SUFFIX.sub("", folder.name),
        "seed": cell["seed"],
        "metric": cell["metric"],
        "baseline": cell["baseline"],
        "teacher": cell["teacher"],
        "student": cell["student"],
        "retention": cell["retention"],
        "margin_share": cell["margin_kept"],
        "sparsity": cell["measured_sparsity"],
        "epochs": cell["student_epochs"],
        "learning_rate": cell["student_lr"],
        "train_examples": cell["train_examples"],
        "augmented_examples": cell.get("augmented_examples"),  # originals + teacher-labelled variants
        "recipe": Path(cfg["recipe"]).stem if cfg.get("recipe") else None,
        "recipe_args": {k: v for k, v in cfg["recipe_args"].items() if k not in ("num_epochs", "final_sparsity")},
        "student_minutes": cell["student_minutes"],
        "machine": cell["machine"] + (f", {'/'.join(metrics['machine']['cpu_features'])}"
                                      if metrics["machine"].get("device") == "cpu" else ""),
        "precision": cfg["precision"],
        "command": command.read_text().strip() if command.is_file() else None,
        "page_row": cell,  # the frontier page's row, for --frontier
    }


def page_row(logged: dict, variant: str) -> dict:
    """A logged cell as a row of the frontier page (sweep.row's fields), under ``variant``. Rows
    logged before the log kept the page's row are rebuilt from the log's own fields (they
    lack only the count of non-zero weights, which a page of pruned cells does not show)."""
    if logged.get("page_row"):  # the nominal sparsity, as rebuilt rows have it (the page groups by it)
        return {**logged["page_row"], "variant": variant, "sparsity": round(logged["page_row"]["sparsity"], 2)}
    if logged.get("recipe") == "distill" or len(glue.dev_splits(glue.get_task(logged["task"]))) > 1:
        raise SystemExit(f"{logged['cell']}: a small dense student or a task of two dev splits cannot be rebuilt "
                         "from the log (its run folder is gone)")
    sparsity = round(logged["sparsity"], 2)
    target = TARGET_RETENTION.get(sparsity)
    beats = logged["student"] > logged["baseline"]
    return {"task": logged["task"], "metric": logged["metric"], "variant": variant, "sparsity": sparsity,
            "measured_sparsity": logged["sparsity"], "student_layers": None, "nonzero_encoder_linears": None,
            "equivalent_sparsity": logged["sparsity"], "baseline": logged["baseline"], "teacher": logged["teacher"],
            "student": logged["student"], "retention": logged["retention"], "target_retention": target,
            "margin_kept": logged["margin_share"], "target_met": None if target is None else
            logged["retention"] >= target and beats, "beats_baseline": beats,
            "student_minutes": logged["student_minutes"], "train_examples": logged["train_examples"],
            "augmented_examples": logged.get("augmented_examples"), "student_epochs": logged["epochs"],
            "student_lr": logged["learning_rate"], "seed": logged["seed"], "machine": logged["machine"].rsplit(", ", 1)[0]}


def write_frontier(rows: list[dict], cells: list[str], out: Path) -> None:
    """The frontier page of the named logged cells (one per task and sparsity: today's defaults),
    shown as the variant "default"; a name not in the log is refused."""
    logged = {r["cell"]: r for r in rows}
    unknown = [c for c in cells if c not in logged]
    if unknown:
        raise SystemExit(f"not in the log: {', '.join(unknown)}")
    places = [(logged[c]["task"], round(logged[c]["sparsity"], 2)) for c in cells]
    twice = sorted({f"{t} at {s:.0%}" for t, s in places if places.count((t, s)) > 1})
    if twice:
        raise SystemExit(f"one cell per task and sparsity: {', '.join(twice)} named twice")
    note = ("Written by `python benchmarks/study_log.py --frontier ...` from the study's log "
            "([docs/study/results.md](../study/results.md)): each task's cell at each sparsity with the defaults "
            f"of the day it ran, one seed each: {', '.join(f'`{c}`' for c in cells)}.")
    write(sorted((page_row(logged[c], "default") for c in cells), key=lambda r: (r["task"], r["sparsity"])),
          out, note=note)


def logged_rows(results: Path) -> list[dict]:
    """The cells an earlier run of this script logged (empty when there is no log yet)."""
    return json.loads(results.read_text())["cells"] if results.is_file() else []


def merged(logged: list[dict], found: list[dict]) -> list[dict]:
    """The log's rows, with every cell found on disk added or, when logged before, replaced."""
    found_cells = {r["cell"] for r in found}
    seeds = {(r["task"], r["group"], r["seed"]): r["cell"] for r in logged}
    for r in found:  # the same cell under another root would count its seed twice
        other = seeds.get((r["task"], r["group"], r["seed"]))
        if other is not None and other != r["cell"]:
            raise SystemExit(f"{r['cell']} is logged as {other} (same task, group and seed): run this on the "
                             "folder the log was written from")
    replaced = sorted(found_cells & {r["cell"] for r in logged})
    if replaced:
        print(f"replacing the logged rows of {', '.join(replaced)} with the run folders' figures")
    return sorted([r for r in logged if r["cell"] not in found_cells] + found, key=lambda r: r["cell"])


def groups(rows: list[dict]) -> list[dict]:
    """Mean and spread (min to max) of every (task, group) with two or more seeds."""
    out = []
    for key in sorted({(r["task"], r["group"]) for r in rows}):
        members = [r for r in rows if (r["task"], r["group"]) == key]
        if len(members) < 2:
            continue
        settings = {json.dumps([r["learning_rate"], r.get("recipe"), r["recipe_args"], r["epochs"],
                                r["train_examples"], r.get("augmented_examples")], sort_keys=True) for r in members}
        if len(settings) > 1:  # seeds of one cell differ only in their seed
            raise SystemExit(f"{key[0]}/{key[1]}: its seeds were trained with different settings "
                             "(learning rate, recipe, recipe args, epochs or data); name the cells apart")
        scores = [r["student"] for r in members]
        out.append({"task": key[0], "group": key[1], "seeds": sorted(r["seed"] for r in members),
                    "mean": statistics.mean(scores), "stdev": statistics.stdev(scores),
                    "min": min(scores), "max": max(scores),
                    "mean_retention": statistics.mean(r["retention"] for r in members),
                    "mean_margin_share": statistics.mean(r["margin_share"] or 0.0 for r in members)})
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def markdown(rows: list[dict], summary: list[dict], previous: list[dict]) -> str:
    lines = ["# Study results log", "",
             "Written by `python benchmarks/study_log.py`; one row per trained cell. Metric: the final "
             "model's dev score (never a best epoch); sparsity: measured in the saved weights; "
             "margin kept: (student - baseline) / (teacher - baseline). The lr column is the rate each cell ran "
             "at: a command without `--student-lr` ran at the default of its day (1e-4 before 2026-12-02 16:16, "
             "3e-4 since).", ""]
    for task in sorted({r["task"] for r in rows}):
        lines += [f"## {task}", "",
                  "| cell | seed | recipe args | lr | epochs | train ex. | sparsity | student | teacher | baseline "
                  "| kept | margin kept | minutes | machine, precision |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["task"] == task), key=lambda r: r["cell"]):
            args = json.dumps(r["recipe_args"]) if r["recipe_args"] else "defaults"
            if r.get("recipe") not in (None, "sparsebert"):
                args = f"{r['recipe']}: {args}"
            extra = (r.get("augmented_examples") or r["train_examples"]) - r["train_examples"]
            examples = f"{r['train_examples']}" + (f" + {extra}" if extra else "")
            lines.append(f"| {r['cell']} | {r['seed']} | `{args}` | {r['learning_rate']:g} | {r['epochs']:g} | {examples} "
                         f"| {r['sparsity'] * 100:.2f}% | {r['student']:.2f} | {r['teacher']:.2f} | {r['baseline']:.2f} "
                         f"| {_pct(r['retention'])} | {_pct(r['margin_share'])} | {r['student_minutes']:.1f} "
                         f"| {r['machine']}, {r['precision']} |")
        lines.append("")
    if summary:
        lines += ["## Seeds", "", "| task | cell | seeds | mean | stdev | range | mean kept | mean margin kept |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['task']} | {g['group']} | {', '.join(map(str, g['seeds']))} | {g['mean']:.2f} "
                  f"| {g['stdev']:.2f} | {g['min']:.2f}-{g['max']:.2f} | {_pct(g['mean_retention'])} "
                  f"| {_pct(g['mean_margin_share'])} |" for g in summary]
        lines.append("")
    if previous:
        lines += ["## Earlier figures (the frontier page before this study)", "",
                  "| task | variant | sparsity | student | teacher | baseline | kept | margin kept | machine |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['task']} | {p['variant']} | {p['measured_sparsity'] * 100:.2f}% | {p['student']:.2f} "
                  f"| {p['teacher']:.2f} | {p['baseline']:.2f} | {_pct(p['retention'])} "
                  f"| {_pct(margin_share(p['student'], p['teacher'], p['baseline']))} | {p['machine']} |"
                  for p in previous if p.get("student") is not None]
        lines.append("")
    lines += ["## Commands", ""] + [f"- `{r['cell']}`: `{r['command']}`" for r in rows if r["command"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding the cells' run folders")
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument("--previous", type=Path, help="an earlier frontier.json to show beside the new rows")
    parser.add_argument("--frontier", nargs="+", metavar="CELL",
                        help="also write the frontier page of these logged cells (task/cell names)")
    parser.add_argument("--frontier-out", type=Path, default=Path("docs/frontier"))
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs}: no such folder")
    cells = sorted(p.parent for p in args.runs.rglob("metrics.json"))
    if not cells:
        parser.error(f"{args.runs}: no finished cell (metrics.json) under it")
    rows = merged(logged_rows(args.out / "results.json"), [cell_row(folder, args.runs) for folder in cells])
    previous = json.loads(args.previous.read_text()) if args.previous else []
    summary = groups(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"cells": rows, "seeds": summary}, indent=1))
    (args.out / "results.md").write_text(markdown(rows, summary, previous))
    print(f"{len(rows)} cells -> {args.out / 'results.md'}")
    if args.frontier:
        write_frontier(rows, args.frontier, args.frontier_out)
        print(f"{len(args.frontier)} cells -> {args.frontier_out / 'frontier.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
