"""The training stage end to end on a slice of real RTE, its CLI errors, and SparseML's own
console entry point reading the project's recipe."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from console import sparseml_script

from sparsebert.checkpoint import is_pruned, load_weights, pruned_patterns
from sparsebert.cli import main
from sparsebert.pipeline.report import kept_weights_moved

REPO = Path(__file__).resolve().parents[1]


def test_run_folder_holds_both_models_and_metrics(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["task"] == "rte" and metrics["main_metric"] == "accuracy"
    for which in ("teacher", "student"):
        config = json.loads((trained_run / which / "config.json").read_text())
        assert set(config["id2label"].values()) == {"entailment", "not_entailment"}
        assert 0 <= metrics[which]["dev"]["dev"]["accuracy"] <= 100
    assert (trained_run / "student" / "recipe.yaml").is_file()
    assert metrics["teacher"]["encoder_linear_sparsity"] < 0.01


def test_saved_student_reaches_target_and_rest_stays_dense(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    student = metrics["student"]
    assert len(student["per_matrix_sparsity"]) == 6 * 6  # six linears in each of six layers
    for name, sparsity in student["per_matrix_sparsity"].items():
        assert sparsity == pytest.approx(0.9, abs=0.005), name
    for name, weight in load_weights(trained_run / "student").items():
        if weight.ndim == 2 and name not in student["per_matrix_sparsity"]:  # biases may start at 0
            assert (weight == 0).mean() < 0.01, name
    assert student["flops"]["encoder_flops_reduction"] > 2
    assert student["parameters_nonzero_total"] < metrics["teacher"]["parameters_nonzero_total"]


def test_student_started_from_pretrained_not_teacher(trained_run):
    """Knowledge-aware order: the pre-trained model is pruned while distilled, not the teacher."""
    import numpy as np

    from sparsebert.models import embedded_default

    student_config = json.loads((trained_run / "student" / "config.json").read_text())
    assert Path(student_config["_name_or_path"]) == embedded_default()
    pretrained = load_weights(embedded_default())
    teacher = load_weights(trained_run / "teacher")
    name = "encoder.layer.0.attention.self.query.weight"
    assert not np.array_equal(teacher[f"bert.{name}"], pretrained[name])  # the teacher was fine-tuned


def _kept_weights_moved(weights: dict, pretrained: dict) -> float:
    return kept_weights_moved(weights, pretrained, pruned_patterns())


def test_student_learned_kept_weights_moved_and_classifier_trained(trained_run):
    """The first student shipped here kept the pre-trained weights and a zero classifier bias."""
    from sparsebert.models import embedded_default

    student = load_weights(trained_run / "student")
    assert _kept_weights_moved(student, load_weights(embedded_default())) > 0.5
    assert np.abs(student["classifier.bias"]).max() > 0  # HF initialises it to exactly 0
    curve = json.loads((trained_run / "student" / "curve.json").read_text())
    assert max(point["applied_learning_rate"] for point in curve) > 0
    assert (trained_run / "student" / "curve.png").stat().st_size > 10_000
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["student"]["curve"]["points"] == len(curve)
    assert metrics["student"]["kept_weights_moved"] > 0.5


def test_one_source_of_truth_for_epochs_and_sparsity(trained_run, glue_dir, tmp_path, capsys):
    import yaml

    state = json.loads((trained_run / "student" / "trainer_state.json").read_text())
    assert state["num_train_epochs"] == 2 and state["log_history"][-1]["epoch"] == 2  # what the trainer ran
    recipe = yaml.safe_load(re.sub(r"!\w+", "", (trained_run / "student" / "recipe.yaml").read_text()))
    assert max(m["end_epoch"] for m in recipe["modifiers"]) == 2  # what the recipe's schedule ran
    base = ["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "r")]
    err = _one_line_error(base + ["--student-epochs", "10", "--recipe-args", '{"num_epochs": 3}'], capsys)
    assert "--student-epochs 10.0 disagrees with --recipe-args num_epochs=3" in err
    err = _one_line_error(base + ["--sparsity", "0.9", "--recipe-args", '{"final_sparsity": 0.8}'], capsys)
    assert "disagrees" in err
    fixed = tmp_path / "fixed.yaml"  # a recipe with no num_epochs variable: its modifiers set the length
    fixed.write_text((REPO / "recipes" / "sparsebert.yaml").read_text().replace("num_epochs: 10.0\n", "")
                     .replace("eval(num_epochs * prune_end_fraction / mask_updates)", "0.06")
                     .replace("eval(num_epochs * prune_end_fraction)", "6.0").replace("eval(num_epochs)", "10.0"))
    err = _one_line_error(base + ["--recipe", str(fixed), "--student-epochs", "3"], capsys)
    assert "does not declare" in err
    assert "invalid recipe" not in err  # the recipe itself loads; only the flag is refused


def test_a_recipe_that_sets_the_rate_gets_the_students(glue_dir, tmp_path, capsys):
    """sparsebert-cyclic declares learning_rate: --student-lr fills it; --recipe-args alone sets it
    (the flag's default is no choice); the two disagreeing are refused."""
    from sparsebert.pipeline.request import STUDENT_LR, TrainRequest, check, plan

    def student(**fields):
        request = TrainRequest(task="rte", out=tmp_path / "r", glue_dir=str(glue_dir),
                               **{"recipe": "sparsebert-cyclic", **fields})
        return plan(check(request))[2]

    assert student(student_lr=2e-4).recipe_args["learning_rate"] == student(student_lr=2e-4).learning_rate == 2e-4
    alone = student(recipe_args={"learning_rate": 5e-5})
    assert alone.recipe_args["learning_rate"] == alone.learning_rate == 5e-5
    assert student().recipe_args["learning_rate"] == student().learning_rate == STUDENT_LR
    assert student(recipe="sparsebert").learning_rate == STUDENT_LR  # a recipe without the variable
    base = ["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "r"), "--recipe",
            "sparsebert-cyclic"]
    err = _one_line_error(base + ["--student-lr", "2e-4", "--recipe-args", '{"learning_rate": 5e-5}'], capsys)
    assert "--student-lr 0.0002 disagrees with --recipe-args learning_rate=5e-05" in err
    err = _one_line_error(base + ["--student-lr", str(STUDENT_LR), "--recipe-args", '{"learning_rate": 5e-5}'], capsys)
    assert "disagrees" in err  # typed, the default's own value is a choice too


def test_stsb_defaults_to_the_augmented_schedule(glue_dir, tmp_path, capsys):
    """STS-B up to 90% defaults to 4 teacher-labelled variants per pair, 3 epochs, pruning over the
    first 40% (the study's 90%: 71.3 over two seeds against 58.5); at 95%, on other tasks, or with
    any schedule flag given, the recipe's; --augment 0 is none."""
    from sparsebert.pipeline.request import TrainingRefused, TrainRequest, check, plan

    def planned(task="stsb", **fields):
        opts, _, student, _ = plan(check(TrainRequest(**{"task": task, "out": tmp_path / "r", "glue_dir": str(glue_dir),
                                                         "sparsity": 0.9, **fields})))
        return opts.augment, student.epochs, student.recipe_args.get("prune_end_fraction")

    assert planned() == planned(sparsity=0.8) == (4, 3.0, 0.4)
    # At the recipe's 95% it did not help: the recipe's schedule.
    assert planned(sparsity=None) == planned(sparsity=None, recipe_args={"final_sparsity": 0.95}) == (None, 10.0, None)
    assert "stsb's default schedule" in capsys.readouterr().out  # the run says which schedule it took
    for task in ("mrpc", "rte", "sst2"):  # the recipe's own: 10 epochs, pruning over its first 60%
        assert planned(task) == (None, 10.0, None)
    assert planned(student_epochs=5.0) == (None, 5.0, None)
    assert planned(augment=0) == (0, 10.0, None) and planned(augment=2) == (2, 10.0, None)
    for schedule in ({"prune_end_fraction": 0.5}, {"prune_start_fraction": 0.1}, {"num_epochs": 4}):
        assert planned(recipe_args=schedule)[0] is None  # a schedule variable given: the user's own schedule
    assert planned(recipe="sparsebert-cyclic")[0] is None
    options = plan(check(TrainRequest(task="stsb", out=tmp_path / "r", glue_dir=str(glue_dir), sparsity=0.9)))[0]
    assert options.task_schedule == {"augment": 4, "student_epochs": 3.0, "prune_end_fraction": 0.4}  # metrics.json
    assert plan(check(TrainRequest(task="stsb", out=tmp_path / "r", sparsity=0.9, augment=0)))[0].task_schedule is None
    assert check(TrainRequest(task="stsb", out=tmp_path / "r", sparsity=0.9, augment_cache=tmp_path / "c"))  # it augments
    with pytest.raises(TrainingRefused, match="--augment-cache needs --augment N"):
        check(TrainRequest(task="stsb", out=tmp_path / "r", sparsity=0.9, augment_cache=tmp_path / "c",
                           student_epochs=2.0))
    err = _one_line_error(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "x"),
                           "--augment", "-1"], capsys)
    assert "--augment must be 0 (none) or more" in err


def test_rerun_never_overwrites_silently(trained_run, glue_dir, capsys):
    before = (trained_run / "metrics.json").read_bytes()
    code = main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(trained_run), "--limit", "8"])
    assert code == 2
    assert "already holds a result" in capsys.readouterr().err
    assert (trained_run / "metrics.json").read_bytes() == before


def _one_line_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("sparsebert train: error:")
    return err


def test_bad_inputs_fail_before_training(tmp_path, glue_dir, capsys):
    base = ["train", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "run")]
    assert "unknown task" in _one_line_error(base + ["--task", "glue9"], capsys)
    assert "[0, 1)" in _one_line_error(base + ["--task", "rte", "--sparsity", "1.0"], capsys)
    missing = ["train", "--task", "rte", "--glue-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    assert "GLUE directory not found" in _one_line_error(missing, capsys)
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("version: 1.1.0\nfinal_sparsity: 0.9\nmodifiers:\n  - !MagicModifier\n    start_epoch: 0\n")
    assert "invalid recipe" in _one_line_error(base + ["--task", "rte", "--recipe", str(bad_recipe)], capsys)
    assert "not valid JSON" in _one_line_error(base + ["--task", "rte", "--recipe-args", "{x"], capsys)
    assert "has only 6 layers" in _one_line_error(base + ["--task", "rte", "--student-layers", "7"], capsys)
    assert "does not go with --student-init teacher" in _one_line_error(
        base + ["--task", "rte", "--student-layers", "1", "--student-init", "teacher"], capsys)
    broken = tmp_path / "glue"
    (broken / "RTE").mkdir(parents=True)
    (broken / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (broken / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    err = _one_line_error(["train", "--task", "rte", "--glue-dir", str(broken), "--out", str(tmp_path / "b")], capsys)
    assert "train.tsv:2: label 'maybe'" in err
    assert not (tmp_path / "run" / "teacher").exists()


def test_teacher_limit_trains_the_teacher_on_a_subset_and_the_student_on_all(trained_run, glue_dir, tmp_path, capsys):
    """--teacher-limit: the teacher fine-tunes on a seeded random subset (drawn as --limit draws),
    the student distils on every training example; with a reused --teacher it is refused."""
    import random

    run = tmp_path / "run"
    assert main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(run), "--limit", "48",
                 "--teacher-limit", "16", "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "16",
                 "--max-seq-length", "32", "--sparsity", "0.5"]) == 0
    data = json.loads((run / "data" / "data.json").read_text())
    assert data["splits"]["train"]["examples"] == 48 and data["teacher_train"]["examples"] == 16
    assert data["teacher_train"]["path"] == str(run / "data" / "teacher-train.json")  # where it ended up
    assert list(data["splits"]) == ["train", "dev"]  # later stages read every other split as a dev set
    rows = [json.loads(line) for line in (run / "data" / "train.json").read_text().splitlines()]
    subset = [json.loads(line) for line in (run / "data" / "teacher-train.json").read_text().splitlines()]
    assert subset == random.Random(42).sample(rows, 16)
    steps = {which: json.loads((run / which / "trainer_state.json").read_text())["global_step"]
             for which in ("teacher", "student")}
    assert steps == {"teacher": 1, "student": 3}  # 16 and 48 examples in batches of 16
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["teacher_train"]["examples"] == 16
    capsys.readouterr()  # the run's progress bars
    err = _one_line_error(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "r2"),
                           "--teacher", str(trained_run / "teacher"), "--teacher-limit", "16"], capsys)
    assert "a reused --teacher is not trained" in err


def test_teacher_with_another_label_order_is_refused(trained_run, tmp_path, glue_dir, capsys):
    """A reused teacher's logits are distilled id by id: its labels must be in the student's order."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    config = json.loads((trained_run / "teacher" / "config.json").read_text())
    config["id2label"] = {"0": "not_entailment", "1": "entailment"}  # GLUE's order, not the student's
    (teacher / "config.json").write_text(json.dumps(config))
    base = ["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "run")]
    assert "orders its labels" in _one_line_error(base + ["--teacher", str(teacher)], capsys)
    config["id2label"] = {"0": "similarity"}
    (teacher / "config.json").write_text(json.dumps(config))
    assert "orders its labels ['similarity']" in _one_line_error(base + ["--teacher", str(teacher)], capsys)
    assert "needs a teacher with one" in _one_line_error(
        ["train", "--task", "stsb", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "run"),
         "--teacher", str(trained_run / "teacher")], capsys)
    assert not (tmp_path / "run").exists()


def test_sparseml_console_entry_point_runs_the_recipe(trained_run, tmp_path):
    """The documented command: SparseML's own script, the project's recipe and modifier."""
    from sparsebert.models import embedded_default

    out = sparseml_script(trained_run, tmp_path / "student", 1, 0.8, 16, "--logging_steps", "1")
    weights = load_weights(out)
    query = weights["bert.encoder.layer.0.attention.self.query.weight"]
    assert (query == 0).mean() == pytest.approx(0.8, abs=0.005)
    assert "SparseBertDistillationModifier" in (out / "recipe.yaml").read_text()
    assert _kept_weights_moved(weights, load_weights(embedded_default())) > 0.5
    assert abs(weights["classifier.bias"]).max() > 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert max(e.get("applied_learning_rate", 0) for e in history) > 0


def test_weights_moved_is_zero_for_a_pruned_untrained_student():
    """What metrics.json reports as kept_weights_moved: 0 for the student shipped before the
    optimizer fix (pruned, never trained), 1 once every kept weight changed."""
    from sparsebert.models import embedded_default

    pretrained = load_weights(embedded_default())
    patterns = pruned_patterns()
    pruned = {f"bert.{n}": w * (np.abs(w) > np.median(np.abs(w))) if is_pruned(n, patterns) else w
              for n, w in pretrained.items()}
    assert kept_weights_moved(pruned, pretrained, patterns) == 0.0
    trained = {n: w * 1.01 for n, w in pruned.items()}
    assert kept_weights_moved(trained, pretrained, patterns) == 1.0


def test_summary_sets_the_weights_left_against_bert_base():
    """At 95% the default model keeps 0.53 M encoder-linear weights: as few as BERT-base at 99.4%."""
    from sparsebert.pipeline.stage import BERT_BASE_ENCODER_LINEARS, weights_left_line

    assert BERT_BASE_ENCODER_LINEARS == 84_934_656
    minilm = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    line = weights_left_line({"parameters_nonzero_encoder_linears": round(0.05 * minilm),
                              "parameters_encoder_linears": minilm})
    assert "0.53 M of 10.62 M" in line and "4.25 M" in line and "99.4%" in line


def test_the_stage_refuses_what_the_cli_refuses(glue_dir, tmp_path):
    """The training rules live beside the configs: a Python caller of stage.run or request.train
    meets the CLI's refusals, before any data is prepared or model loaded."""
    from sparsebert.pipeline import request as training, stage
    from sparsebert.pipeline.train import TrainConfig
    from sparsebert.recipe import recipe_path

    opts = stage.StageOptions(task="rte", model="unused", out=tmp_path / "run", glue_dir=str(glue_dir))
    teacher = TrainConfig(epochs=1, learning_rate=5e-5)
    recipe = str(recipe_path("sparsebert"))
    student = TrainConfig(epochs=2, learning_rate=1e-4, recipe=recipe, recipe_args={"num_epochs": 2})
    cases = [
        (opts, teacher, TrainConfig(epochs=3, learning_rate=1e-4, recipe=recipe, recipe_args={"num_epochs": 2}),
         "says 3 epochs but its recipe runs 2.0"),
        (opts, TrainConfig(epochs=1, learning_rate=0.0), student, "epochs and learning rate must be positive"),
        (opts, teacher, TrainConfig(epochs=2, learning_rate=1e-4, recipe=recipe,
                                    recipe_args={"num_epochs": 2, "final_sparsity": 1.0}), r"final_sparsity must be in \[0, 1\)"),
        (stage.StageOptions(task="rte", model="unused", out=tmp_path / "run", glue_dir=str(glue_dir),
                            student_layers=1, student_init="teacher"), teacher, student, "does not go with --student-init"),
        (stage.StageOptions(task="rte", model="unused", out=tmp_path / "run", glue_dir=str(tmp_path / "none")),
         teacher, student, "GLUE directory not found"),
    ]
    for options, teacher_cfg, student_cfg, message in cases:
        with pytest.raises(training.TrainingRefused, match=message):
            stage.run(options, teacher_cfg, student_cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    for request, message in [(training.TrainRequest(task="rte", sparsity=1.5), r"--sparsity must be in \[0, 1\)"),
                             (training.TrainRequest(task="rte", int8_epochs=1.0), "--int8-epochs needs --int8"),
                             (training.TrainRequest(task="rte", glue_dir=str(glue_dir), student_epochs=2.0,
                                                    recipe_args={"num_epochs": 3}), "disagrees with --recipe-args")]:
        with pytest.raises(training.TrainingRefused, match=message):
            training.train(request)


def test_a_run_killed_mid_pruning_resumes_to_the_uninterrupted_student(trained_run, glue_dir, tmp_path, capsys):
    """`sparsebert train` SIGKILLed while its student is being pruned, then run again with
    --resume, ends with the student an uninterrupted run trains: the same weights, so the same
    zeros in every matrix and the same dev metric. Without --resume, or asked something else,
    the stopped run is refused rather than thrown away."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["train", "--task", "rte", "--glue-dir", str(glue_dir), "--limit", "32", "--teacher",
            str(trained_run / "teacher"), "--student-epochs", "3", "--batch-size", "8", "--max-seq-length", "32",
            "--sparsity", "0.9", "--checkpoint-every", "2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*args, "--out", str(whole)]) == 0
    # 4 steps an epoch, 12 in all, pruning over the first 7.2: step 6 is in the second epoch, mid-pruning.
    child = subprocess.Popen([str(Path(sys.executable).parent / "sparsebert"), *args, "--out", str(resumed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not list(tmp_path.glob("resumed.partial-*/student/checkpoint-6/recipe_state.pt")):
            assert child.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL and not resumed.exists()
    stopped = next(tmp_path.glob("resumed.partial-*"))
    mid = load_file(stopped / "student" / "checkpoint-6" / "model.safetensors")
    patterns = pruned_patterns(whole / "student")
    assert 0.3 < np.mean([(w == 0).float().mean().item() for n, w in mid.items() if is_pruned(n, patterns)]) < 0.9

    capsys.readouterr()
    assert "pass --resume to go on with it" in _one_line_error([*args, "--out", str(resumed)], capsys)
    err = _one_line_error([*args, "--out", str(resumed), "--resume", "--seed", "7"], capsys)
    assert "configs.student.seed (42 then, 7 now)" in err, err
    assert main([*args, "--out", str(resumed), "--resume"]) == 0
    assert f"resuming the student from {stopped}/student/checkpoint-" in capsys.readouterr().out

    first, second = (load_file(run / "student" / "model.safetensors") for run in (whole, resumed))
    for name, weight in first.items():
        assert np.allclose(second[name].float().numpy(), weight.float().numpy(), atol=1e-6), name
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (whole, resumed)]
    assert metrics[1]["student"]["encoder_linear_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert metrics[1]["student"]["dev"] == metrics[0]["student"]["dev"]
    assert not list((resumed / "student").glob("checkpoint-*")) and not list(tmp_path.glob("*.partial-*"))
    _one_line_error([*args, "--out", str(tmp_path / "never"), "--resume"], capsys)  # nothing to resume


def test_a_resume_asked_the_same_paths_otherwise_written_is_taken_but_not_an_edited_recipe(tmp_path, monkeypatch):
    """The stopped run's request is compared path for path: `--glue-dir glue` resumed as
    `--glue-dir $PWD/glue` (or a teacher given relatively, then absolutely) asks the same and is
    taken; a recipe edited in between is another schedule, refused."""
    from sparsebert.pipeline.stage import ResumeRefused, StageOptions, _same_request
    from sparsebert.pipeline.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "glue").mkdir()
    (tmp_path / "teacher").mkdir()
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("version: 1.1.0\n")
    partial = tmp_path / "run.partial-1"
    partial.mkdir()

    def asked(where: Path, **changes):
        opts = StageOptions(task="rte", model="all-MiniLM-L6-v2", out=tmp_path / "run", glue_dir=str(where / "glue"),
                            teacher=str(where / "teacher"), resume=where != Path("."), **changes)
        student = TrainConfig(epochs=1, learning_rate=1e-4, recipe=str(where / "mine.yaml"))
        _same_request(partial, opts, TrainConfig(epochs=1, learning_rate=1e-4), student, None)

    asked(Path("."))  # the stopped run, given relative paths
    asked(tmp_path)  # resumed with the absolute ones
    recipe.write_text("version: 1.1.0\nnum_epochs: 2.0\n")
    with pytest.raises(ResumeRefused, match=r"configs\.student\.recipe_sha256"):
        asked(tmp_path)


def test_a_stage_stopped_after_it_finished_is_kept_and_its_checkpoints_removed(tmp_path, monkeypatch):
    """A run killed between a stage's last save (``trainer_state.json``) and the removal of its
    checkpoints left them in the stage's folder: resumed, the stage is not trained again, and
    the checkpoints (hundreds of MB each for the default model) do not end up in the run folder."""
    from sparsebert.pipeline import train as training

    stage = tmp_path / "student"
    (stage / "checkpoint-4").mkdir(parents=True)
    (stage / "checkpoint-4" / "recipe_state.pt").write_bytes(b"")
    (stage / "trainer_state.json").write_text("{}")
    monkeypatch.setattr(training, "run_sparseml", lambda arguments: pytest.fail("trained again"))
    training.run_stage({"output_dir": str(stage)}, "student")
    assert not list(stage.glob("checkpoint-*")) and (stage / "trainer_state.json").is_file()


def test_block4_masks_prune_whole_groups_of_four_inputs(trained_run, glue_dir, tmp_path):
    """mask_type block4 (a recipe variable): each pruned matrix loses whole groups of 4 neighbouring
    weights along a row's inputs, the pattern DeepSparse's INT8 kernels favour, at the target."""
    run = tmp_path / "block4"
    assert main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(run), "--limit", "32",
                 "--teacher", str(trained_run / "teacher"), "--student-epochs", "1", "--batch-size", "16",
                 "--max-seq-length", "32", "--sparsity", "0.75", "--recipe-args", '{"mask_type": "block4"}']) == 0
    pruned = json.loads((run / "metrics.json").read_text())["student"]["per_matrix_sparsity"]
    weights = load_weights(run / "student")
    assert len(pruned) == 36
    for name in pruned:
        groups = (weights[name].reshape(weights[name].shape[0], -1, 4) == 0).sum(axis=-1)
        assert set(np.unique(groups)) <= {0, 4}, name  # a group goes whole or stays whole
        assert (groups == 4).mean() == pytest.approx(0.75, abs=0.01), name
