"""`sparsebert sweep`: every cell of the grid is a real (tiny) training run; the teacher is trained
once per task and reused, augmented data is made once, and a sweep run again trains only what is
missing."""

import json
import os
from pathlib import Path

import pytest
from tiny import tiny_task_checkpoint

from sparsebert import glue
from sparsebert.cli import main
from sparsebert.cli import sweep_settings
from sparsebert.pipeline import request as training
from sparsebert.pipeline.sweep import SweepError, sweep, variant_settings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_task_checkpoint(glue.get_task("rte"), tmp_path_factory.mktemp("tiny") / "model")


def test_sweep_trains_each_cell_once_and_resumes(tiny_model, glue_dir, tmp_path):
    calls = []

    def train(request):
        calls.append(request)
        return training.train(request)

    flags = {"model": str(tiny_model), "glue_dir": str(glue_dir), "limit": 24, "teacher_epochs": 1.0,
             "student_epochs": 1.0, "max_seq_length": 32, "batch_size": 8}
    out = tmp_path / "sweep"
    rows = sweep(["rte"], [0.5, 0.8], ["base", "aug1", "ptf", "ftp"], out, flags, train=train)
    assert len(rows) == len(calls) == 8
    assert calls[0].teacher is None and all(c.teacher for c in calls[1:])  # one teacher per task
    assert sorted(p.name for p in (out / "rte" / "augment").iterdir()) == ["augment-n1-s42"]  # made once
    assert {(r["variant"], r["sparsity"]) for r in rows} == {(v, s) for v in ("base", "aug1", "ptf", "ftp") for s in (0.5, 0.8)}
    assert all(r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=0.01) for r in rows)
    assert rows[0]["train_examples"] == 24 and rows[0]["student_epochs"] == 1  # the page shows the short schedule
    page = (out / "frontier.md").read_text()
    assert page.count("| rte | aug1 |") == 2 and (out / "frontier.png").stat().st_size > 10_000
    assert "## Claim 1" in page and "| rte | 50% |" in page and "| rte | 80% |" in page
    # The page says each cell's rate and seed (pages of different defaults sit side by side in the log).
    assert rows[0]["student_lr"] == 3e-4 and rows[0]["seed"] == 42 and "| 1 | 0.0003 | 42 |" in page

    # The orders: ftp's student starts from the fine-tuned teacher; ptf's is pruned to the target at once.
    ftp = json.loads((out / "rte" / "ftp-80" / "student" / "config.json").read_text())
    assert ftp["_name_or_path"] == str(out / "rte" / "base-50" / "teacher")
    ptf_recipe = (out / "rte" / "ptf-80" / "student" / "recipe.yaml").read_text()
    assert "init_sparsity: 0.8" in ptf_recipe
    # The augmented student trained on the originals and their variants.
    samples = {v: json.loads((out / "rte" / f"{v}-80" / "student" / "all_results.json").read_text())["train_samples"]
               for v in ("base", "aug1")}
    assert samples == {"base": 24, "aug1": 48}

    calls.clear()
    assert sweep(["rte"], [0.5, 0.8], ["base", "aug1", "ptf", "ftp"], out, flags, train=train) == rows  # all kept
    assert calls == []
    (out / "rte" / "aug1-80" / "metrics.json").unlink()  # an interrupted cell
    assert len(sweep(["rte"], [0.5, 0.8], ["base", "aug1", "ptf", "ftp"], out, flags, train=train, page_only=True)) == 7
    assert calls == [] and "Not run yet: rte aug1-80." in (out / "frontier.md").read_text()
    sweep(["rte"], [0.5, 0.8], ["base", "aug1", "ptf", "ftp"], out, flags, train=train)
    assert len(calls) == 1 and calls[0].out == out / "rte" / "aug1-80"
    calls.clear()  # a grid extended with a new sparsity keeps the task's teacher
    sweep(["rte"], [0.6], ["base"], out, flags, train=train)
    assert calls[0].teacher == str(out / "rte" / "base-50" / "teacher")


def test_small_dense_student_against_sparse(tiny_model, glue_dir, tmp_path):
    """The sparse-vs-small claim: at 80% the 2-layer tiny model's small counterpart keeps one layer,
    dense, distilled from the same teacher; the page sets the two side by side."""
    flags = {"model": str(tiny_model), "glue_dir": str(glue_dir), "limit": 24, "teacher_epochs": 1.0,
             "student_epochs": 1.0, "max_seq_length": 32, "batch_size": 8}
    out = tmp_path / "sweep"
    rows = sweep(["rte"], [0.8], ["base", "small"], out, flags)
    small = json.loads((out / "rte" / "small-l1" / "metrics.json").read_text())
    assert json.loads((out / "rte" / "small-l1" / "student" / "config.json").read_text())["num_hidden_layers"] == 1
    assert "GMPruningModifier" not in (out / "rte" / "small-l1" / "student" / "recipe.yaml").read_text()
    assert small["student"]["encoder_linear_sparsity"] == 0.0  # dense: nothing pruned
    assert small["student"]["kept_weights_moved"] > 0.5  # and it trained
    sparse, dense = (next(r for r in rows if r["variant"] == v) for v in ("base", "small"))
    # The small student starts from the pre-trained model's first layer, and learns from the base cell's teacher.
    from safetensors.numpy import load_file
    start, pretrained = (load_file(str(f / "model.safetensors")) for f in (out / "rte" / "small-l1" / "student-init", tiny_model))
    first = [k for k in start if ".layer.0." in k]
    assert first and all((start[k] == pretrained[next(p for p in pretrained if p.endswith(k))]).all() for k in first)
    assert small["teacher"]["path"] == str(out / "rte" / "base-80" / "teacher")
    teacher_linears = small["teacher"]["parameters_encoder_linears"]
    assert dense["nonzero_encoder_linears"] == teacher_linears // 2 and dense["equivalent_sparsity"] == 0.5
    assert sparse["nonzero_encoder_linears"] == pytest.approx(0.2 * teacher_linears, rel=0.01)
    page = (out / "frontier.md").read_text()
    assert "## Claim 2" in page and f"1 layer(s), {teacher_linears // 2:,} | 2.50x |" in page
    with pytest.raises(SweepError, match="--recipe cannot be a flag for every cell"):
        sweep(["rte"], [0.8], ["base", "small"], out, {**flags, "recipe": "sparsebert"})


def test_variants_are_train_settings():
    assert variant_settings("base") == {} and variant_settings("aug8") == {"augment": 8}
    assert variant_settings("obs") == {"recipe": "sparsebert-obs"}
    assert variant_settings("small", 0.9, 6) == {"student_layers": 1, "recipe": "distill"}
    assert variant_settings("small", 2 / 3, 6) == {"student_layers": 2, "recipe": "distill"}
    for bad in ("aug", "aug0"):
        with pytest.raises(SweepError, match="unknown variant"):
            variant_settings(bad)


def test_sweep_flags_become_the_settings_they_give():
    settings = sweep_settings(["--limit", "24", "--student-epochs", "2", "--recipe-args", '{"hardness": 0.5}',
                               "--seed", "42"])
    assert settings == {"limit": 24, "student_epochs": 2.0, "recipe_args": {"hardness": 0.5}}  # 42 is the default
    with pytest.raises(SweepError, match="--overwrite, --sparsity cannot be a flag for every cell"):
        sweep(["rte"], [0.8], ["base"], Path("unused"), sweep_settings(["--sparsity", "0.5", "--overwrite"]))


def test_bad_sweep_input_is_one_line(tmp_path, capsys):
    assert main(["sweep", "--tasks", "rte", "--sparsities", "1.2", "--out", str(tmp_path)]) == 2
    assert "--sparsities must be in (0, 1)" in capsys.readouterr().err
    assert main(["sweep", "--tasks", "rte", "--variants", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _row(task, retention, beats_baseline, sparsity=0.9):
    return {"task": task, "metric": "m", "variant": "base", "sparsity": sparsity, "measured_sparsity": sparsity,
            "student_layers": None, "nonzero_encoder_linears": 1, "equivalent_sparsity": sparsity, "baseline": 50.0,
            "teacher": 80.0, "student": 80.0 * retention, "retention": retention, "target_retention": 0.95,
            "target_met": retention >= 0.95 and beats_baseline, "beats_baseline": beats_baseline,
            "student_minutes": 1.0, "train_examples": 10, "augmented_examples": None, "student_epochs": 10,
            "machine": "cpu"}


def test_targets_need_the_three_tasks_each_above_its_baseline():
    """MRPC's all-"equivalent" guess keeps 96% of a teacher's F1: retention alone would call it met."""
    from sparsebert.pipeline.sweep import markdown

    guessing = markdown([_row("mrpc", 0.96, False), _row("stsb", 0.97, True), _row("sst2", 0.99, True)])
    assert "| 95% not met; mrpc below the baseline |" in guessing and "95% not met: below the baseline" in guessing
    assert "| 95% met |" in markdown([_row("mrpc", 0.96, True), _row("stsb", 0.97, True), _row("sst2", 0.99, True)])
    assert "not judged: 2 of the target's 3 tasks run" in markdown([_row("mrpc", 0.99, True), _row("sst2", 0.99, True)])


def test_margin_kept_says_what_the_student_learned():
    """MRPC: the all-"equivalent" guess (F1 81.22) keeps 96% of an 84.53 teacher, and 0% of its margin."""
    from sparsebert.pipeline.sweep import margin_share, markdown

    assert margin_share(81.22, 84.53, 81.22) == pytest.approx(0.0)
    assert margin_share(82.875, 84.53, 81.22) == pytest.approx(0.5)
    assert margin_share(80.0, 84.53, 81.22) < 0  # worse than the guess
    assert margin_share(70.0, 60.0, 60.0) is None  # a teacher no better than the baseline
    row = {**_row("sst2", 0.9, True), "margin_kept": margin_share(72.0, 80.0, 50.0)}
    assert "| 90.0% | 73.3% |" in markdown([row])
    guess = {**_row("mrpc", 0.96, False), "margin_kept": 0.0}
    other = {**_row("stsb", 0.97, True), "margin_kept": 0.5}
    assert "| mrpc, stsb | 96.5% | 25.0% |" in markdown([guess, other])  # the mean margin beside the mean kept
    assert "| mrpc, stsb | 96.5% | - |" in markdown([guess, _row("stsb", 0.97, True)])  # not every cell has one


def test_cell_request_keeps_a_given_teacher_and_refuses_clashes(tmp_path):
    from sparsebert.pipeline.sweep import Cell, cell_request

    first = cell_request(Cell("rte", "base", 0.8), tmp_path, None, {"teacher": "given", "limit": 24})
    assert (first.teacher, first.limit, first.sparsity, first.out) == ("given", 24, 0.8, tmp_path / "rte" / "base-80")
    assert cell_request(Cell("rte", "base", 0.8), tmp_path, tmp_path / "found", {"teacher": "given"}).teacher == \
        str(tmp_path / "found")
    # --teacher-limit shapes the first cell's teacher; the cells that reuse it train none.
    assert cell_request(Cell("rte", "base", 0.8), tmp_path, None, {"teacher_limit": 16}).teacher_limit == 16
    assert cell_request(Cell("rte", "base", 0.9), tmp_path, tmp_path / "found", {"teacher_limit": 16}).teacher_limit is None
    ptf = cell_request(Cell("rte", "ptf", 0.8), tmp_path, None, {"recipe_args": {"hardness": 0.5}})
    assert ptf.recipe_args == {"hardness": 0.5, "init_sparsity": 0.8, "prune_end_fraction": 0.05, "mask_updates": 1}
    with pytest.raises(SweepError, match="the aug4 variant sets augment itself"):
        cell_request(Cell("rte", "aug4", 0.8), tmp_path, None, {"augment": 2})
    # Every variant on the recipe's schedule: STS-B's own default schedule is not the sweep's base.
    from sparsebert.pipeline.request import plan

    base = cell_request(Cell("stsb", "base", 0.9), tmp_path, None, {})
    assert base.augment == 0 and plan(base)[2].epochs == 10 and plan(base)[0].task_schedule is None
    assert cell_request(Cell("stsb", "base", 0.9), tmp_path, None, {"augment": 2}).augment == 2
    with pytest.raises(SweepError, match="the ptf variant sets init_sparsity itself"):
        cell_request(Cell("rte", "ptf", 0.8), tmp_path, None, {"recipe_args": {"init_sparsity": 0.1}})


def _study_log():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_log", Path(__file__).parents[1] / "benchmarks" / "study_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_log_keeps_the_cells_of_earlier_machines(trained_run, tmp_path, capsys):
    """The run folders of an earlier session are gone; the log's rows of them stay, a seed logged
    there pairs with one trained here, and a cell found again replaces its own row, not others."""
    study_log = _study_log()
    cell = tmp_path / "runs" / "rte" / "t-base-90"
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text((trained_run / "metrics.json").read_text())
    (cell / "command.txt").write_text("sparsebert train --task rte ...")
    out = tmp_path / "docs"
    out.mkdir()
    here = study_log.cell_row(cell, tmp_path / "runs")
    earlier = {**here, "cell": "rte/t-base-90-s2", "seed": 2, "student": here["student"] + 2.0, "machine": "earlier"}
    stale = {**here, "student": -1.0}  # what the log said of this very cell before it was re-run
    (out / "results.json").write_text(json.dumps({"cells": [earlier, stale], "seeds": []}))

    assert study_log.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "replacing the logged rows of rte/t-base-90" in capsys.readouterr().out
    logged = json.loads((out / "results.json").read_text())
    assert [(r["cell"], r["student"]) for r in logged["cells"]] == [("rte/t-base-90", here["student"]),
                                                                   ("rte/t-base-90-s2", here["student"] + 2.0)]
    (seeds,) = logged["seeds"]
    assert seeds["seeds"] == [2, here["seed"]] and seeds["mean"] == pytest.approx(here["student"] + 1.0)
    page = (out / "results.md").read_text()
    assert "| rte/t-base-90-s2 | 2 |" in page and "| earlier, " in page
    assert study_log.main([str(tmp_path / "runs"), "--out", str(out)]) == 0  # run again: nothing doubles
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2
    with pytest.raises(SystemExit, match="is logged as rte/t-base-90"):  # the same cell from one folder down
        study_log.main([str(tmp_path / "runs" / "rte"), "--out", str(out)])


def test_study_log_writes_the_frontier_page_of_named_cells(trained_run, tmp_path):
    """The page is written from the log: a cell on disk keeps the sweep's row, a cell logged by an
    earlier machine (no run folder, no page row) is rebuilt from the log's fields, and a name
    not in the log is refused."""
    study_log = _study_log()
    cell = tmp_path / "runs" / "rte" / "t-base-90"
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text((trained_run / "metrics.json").read_text())
    out = tmp_path / "docs"
    out.mkdir()
    here = study_log.cell_row(cell, tmp_path / "runs")
    earlier = {k: v for k, v in here.items() if k != "page_row"}
    earlier.update(cell="rte/old-80", group="old-80", sparsity=0.8, student=here["teacher"] * 0.99,
                   retention=0.99, margin_share=None, machine="earlier machine, avx2")
    (out / "results.json").write_text(json.dumps({"cells": [earlier], "seeds": []}))
    page = tmp_path / "frontier"
    assert study_log.main([str(tmp_path / "runs"), "--out", str(out), "--frontier", "rte/old-80",
                           "rte/t-base-90", "--frontier-out", str(page)]) == 0
    rows = json.loads((page / "frontier.json").read_text())
    assert [(r["sparsity"], r["variant"]) for r in rows] == [(0.8, "default"), (0.9, "default")]  # nominal, as grouped
    assert rows[0]["target_retention"] == 0.98 and rows[0]["target_met"] is (earlier["student"] > earlier["baseline"])
    assert rows[0]["machine"] == "earlier machine"
    assert rows[1]["student"] == here["student"] and rows[1]["nonzero_encoder_linears"] is not None
    rebuilt = study_log.page_row({k: v for k, v in here.items() if k != "page_row"}, "default")
    for key in set(rows[1]) - {"nonzero_encoder_linears", "machine"}:  # a rebuilt row reads as the sweep's
        assert rebuilt[key] == pytest.approx(rows[1][key]) if isinstance(rows[1][key], float) else rebuilt[key] == rows[1][key], key
    assert "`rte/old-80`" in (page / "frontier.md").read_text() and (page / "frontier.png").is_file()
    with pytest.raises(SystemExit, match="rte at 80% named twice"):
        study_log.main([str(tmp_path / "runs"), "--out", str(out), "--frontier", "rte/old-80", "rte/old-80",
                        "--frontier-out", str(page)])
    with pytest.raises(SystemExit, match="not in the log: rte/missing-90"):
        study_log.main([str(tmp_path / "runs"), "--out", str(out), "--frontier", "rte/missing-90",
                        "--frontier-out", str(page)])


def test_machine_says_when_a_cell_trained_on_fewer_threads_than_cores():
    from sparsebert.pipeline.sweep import machine

    described = {"device": "cpu", "cpu": "AMD EPYC", "physical_cores": 2}
    assert machine(described) == "AMD EPYC (2 cores)"  # older metrics record no threads
    assert machine({**described, "torch_threads": 2}) == "AMD EPYC (2 cores)"
    assert machine({**described, "torch_threads": 1}) == "AMD EPYC (2 cores, 1 used)"
    assert machine({**described, "physical_cores": 1, "torch_threads": 1}) == "AMD EPYC (1 core)"  # pinned
    assert machine({**described, "device": "NVIDIA H100"}) == "NVIDIA H100"


def test_a_cell_a_stopped_sweep_left_half_trained_is_resumed(tmp_path):
    """A cell whose run stopped after it began training (its `.partial-<id>` holds the request)
    goes on from its checkpoint; one stopped before (no request recorded) starts again."""
    from sparsebert.pipeline.stage import REQUEST_FILE
    from sparsebert.pipeline.sweep import Cell, cell_request

    cell = Cell("rte", "base", 0.8)
    assert not cell_request(cell, tmp_path, None, {}).resume
    stopped = tmp_path / "rte" / "base-80.partial-123"
    stopped.mkdir(parents=True)
    assert not cell_request(cell, tmp_path, None, {}).resume  # stopped before training began
    (stopped / REQUEST_FILE).write_text("{}")
    assert cell_request(cell, tmp_path, None, {}).resume
    assert not cell_request(Cell("rte", "base", 0.9), tmp_path, None, {}).resume  # another cell's


def test_a_cell_a_stopped_sweep_trained_with_other_flags_is_trained_again(tmp_path, monkeypatch):
    """A stopped cell the sweep now asks otherwise (its flags changed) is not resumed: --resume
    refuses it, and the cell starts again rather than stopping the sweep at each run."""
    from sparsebert.pipeline.stage import REQUEST_FILE, ResumeRefused
    from sparsebert.pipeline import stage
    from sparsebert.pipeline.sweep import Cell, run_cell

    monkeypatch.setattr(stage, "summary", lambda metrics: "")
    cell = Cell("rte", "base", 0.8)
    (tmp_path / "rte" / "base-80.partial-123").mkdir(parents=True)
    (tmp_path / "rte" / "base-80.partial-123" / REQUEST_FILE).write_text("{}")
    asked = []

    def train(request):
        asked.append(request.resume)
        if request.resume:
            raise ResumeRefused("--resume must be asked what the stopped run was: it differs in configs.student.seed")
        (request.out).mkdir(parents=True)
        (request.out / "metrics.json").write_text('{"done": true}')
        return {"done": True}

    assert run_cell(cell, tmp_path, None, {}, train) == {"done": True} and asked == [True, False]


@pytest.fixture
def hub_switches_kept(monkeypatch):
    """`sweep` without --glue-dir opens the hub for GLUE (offline.configure sets the switches in
    os.environ): put them back after the test, or the session's later training runs go online."""
    from sparsebert.offline import _HUB_SWITCHES

    for name in _HUB_SWITCHES:
        monkeypatch.setenv(name, os.environ.get(name, "1"))


def test_print_jobs_covers_every_run_folder_once_teachers_first(capsys, tmp_path, monkeypatch, hub_switches_kept):
    """`sweep --print-jobs`: phase 1 one job per task (the cells at the first sparsity, which make
    the teacher and augmented data the rest reuse), phase 2 one job per other run folder (small's
    90% and 95% share one), each given phase 1's teacher by path, phase 3 the page; each command
    is a sweep the CLI takes, with the train flags passed on and --out absolute."""
    import shlex

    from sparsebert.cli import build_parser
    from sparsebert.pipeline.sweep import Cell

    monkeypatch.chdir(tmp_path)
    grid = ["--tasks", "mrpc", "stsb", "--sparsities", "0.5", "0.9", "0.95", "--variants", "base", "small"]
    assert main(["sweep", *grid, "--out", "s", "--print-jobs", "--", "--limit", "100"]) == 0
    phases, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# "):
            current = phases.setdefault(line[2], [])
        elif line.strip():
            current.append(build_parser().parse_args(shlex.split(line)[1:]))
    assert sorted(phases) == ["1", "2", "3"]
    out = tmp_path / "s"
    folders = lambda jobs: [(t, Cell(t, v, s).name) for a in jobs for t in a.tasks for v in a.variants for s in a.sparsities]
    assert [(a.tasks, a.sparsities, a.variants) for a in phases["1"]] == \
        [(["mrpc"], [0.5], ["base", "small"]), (["stsb"], [0.5], ["base", "small"])]
    assert all(len(folders([a])) == 1 for a in phases["2"])
    every = {(t, Cell(t, v, s).name) for t in ("mrpc", "stsb") for v in ("base", "small") for s in (0.5, 0.9, 0.95)}
    jobs = folders(phases["1"] + phases["2"])
    assert len(jobs) == len(set(jobs)) and set(jobs) == every  # each run folder in exactly one job
    assert ("mrpc", "small-l1") in every and len(every) == 10  # 90% and 95% share small-l1 on 6 layers
    (page,) = phases["3"]
    assert page.page_only and set(folders([page])) == every
    for args in phases["1"] + phases["3"]:
        assert args.out == out and args.train_flags == ["--", "--limit", "100"]
    for args in phases["2"]:
        teacher = out / args.tasks[0] / "base-50" / "teacher"
        assert args.out == out and args.train_flags == ["--", "--limit", "100", "--teacher", str(teacher)]
    assert not out.exists()  # nothing trained or written
    assert main(["sweep", *grid, "--out", "s", "--print-jobs", "--", "--sparsity", "0.9"]) == 2  # checked as a sweep
    assert "--sparsity cannot be a flag for every cell" in capsys.readouterr().err


def test_print_jobs_finds_an_earlier_teacher_recorded_relative_and_names_folders_as_the_sweep(
        capsys, tmp_path, monkeypatch, hub_switches_kept):
    """A teacher an earlier sweep recorded relative to where it ran is found from anywhere and
    given absolute; a task written SST-2 is the folder sst2; path flags are printed absolute."""
    import shlex

    from sparsebert.cli import build_parser

    cell = tmp_path / "s" / "sst2" / "base-80"
    (cell / "teacher").mkdir(parents=True)
    (cell / "teacher" / "config.json").write_text("{}")
    (cell / "metrics.json").write_text(json.dumps({"teacher": {"path": "s/sst2/base-80/teacher"}}))
    (tmp_path / "glue").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["sweep", "--tasks", "SST-2", "--sparsities", "0.9", "0.95", "--out", "../s", "--print-jobs",
                 "--", "--glue-dir", "../glue"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    phase2 = build_parser().parse_args(shlex.split(lines[1])[1:])
    assert phase2.tasks == ["sst2"] and phase2.out == tmp_path / "s"
    assert phase2.train_flags == ["--", "--glue-dir", str(tmp_path / "glue"), "--teacher", str(cell / "teacher")]
