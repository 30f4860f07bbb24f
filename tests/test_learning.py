"""Short real runs on GLUE slices show learning, not only that training ran: the loss falls, the
student beats the majority baseline, and STS-B (regression) trains through both entry points."""

import json

import pytest
from console import sparseml_script

from sparsebert import glue
from sparsebert.cli import main
from sparsebert.pipeline.data import read_jsonl
from sparsebert.pipeline.report import evaluate


def _train(glue_dir, out, task, limit, teacher_epochs, student_epochs, sparsity, batch_size=32, extra=()):
    code = main(["train", "--task", task, "--glue-dir", str(glue_dir), "--out", str(out), "--limit", str(limit),
                 "--teacher-epochs", str(teacher_epochs), "--student-epochs", str(student_epochs),
                 "--batch-size", str(batch_size), "--max-seq-length", "64", "--sparsity", str(sparsity), *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def sst2_run(glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learning") / "sst2"
    return out, _train(glue_dir, out, "sst2", limit=2000, teacher_epochs=2, student_epochs=4, sparsity=0.8)


def test_distillation_loss_falls(sst2_run):
    out, _ = sst2_run
    curve = json.loads((out / "student" / "curve.json").read_text())
    first, last = curve[0], curve[-1]
    assert last["distillation_loss"] < 0.9 * first["distillation_loss"], (first, last)
    assert last["logits_loss"] < 0.8 * first["logits_loss"]  # the student took on the teacher's answers
    assert last["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_student_beats_the_majority_baseline(sst2_run):
    _, metrics = sst2_run
    student = metrics["student"]["dev"]["dev"]["accuracy"]
    baseline = metrics["baseline"]["dev"]["accuracy"]
    assert baseline == pytest.approx(50, abs=5)  # SST-2 dev is balanced
    assert student > baseline + 10, (student, baseline)
    assert metrics["student_beats_baseline"] is True


@pytest.fixture(scope="module")
def stsb_run(glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learning") / "stsb"
    return out, _train(glue_dir, out, "stsb", limit=800, teacher_epochs=3, student_epochs=3, sparsity=0.5,
                       batch_size=16, extra=["--teacher-lr", "1e-4"])


def test_stsb_trains_teacher_and_student(stsb_run):
    """SparseML's script stopped at once on STS-B (UnboundLocalError in _get_label_info)."""
    out, metrics = stsb_run
    config = json.loads((out / "student" / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["problem_type"] == "regression"
    assert metrics["teacher"]["dev"]["dev"]["pearson"] > 20
    assert metrics["student"]["dev"]["dev"]["pearson"] > 10
    assert metrics["baseline"]["dev"]["pearson"] == 0.0
    curve = json.loads((out / "student" / "curve.json").read_text())
    assert all(point["logits_loss"] >= 0 for point in curve)  # MSE on the one logit, not KL (always 0)
    assert curve[-1]["logits_loss"] < curve[0]["logits_loss"]


def test_stsb_through_sparseml_console_script(stsb_run, tmp_path):
    out, _ = stsb_run
    student = sparseml_script(out, tmp_path / "student", epochs=3, sparsity=0.5, batch_size=16)
    dev = {"dev": read_jsonl(out / "data" / "dev.json")}
    assert evaluate(glue.get_task("stsb"), student, dev, 64)["dev"]["pearson"] > 10
