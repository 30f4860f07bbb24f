"""`sparsebert train` under torchrun: two processes on the CPU (gloo) train the run one process
trains, with the same global batch and steps, the same pruning masks on both ranks, and a
student close to the one-process student."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from tiny import tiny_pretrained

from sparsebert import families
from sparsebert.checkpoint import is_pruned, load_weights
from sparsebert.cli import main


def _train_arguments(glue_dir, model, out):
    return ["train", "--task", "rte", "--glue-dir", str(glue_dir), "--model", str(model), "--out", str(out),
            "--limit", "64", "--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "16",
            "--max-seq-length", "32", "--sparsity", "0.8", "--teacher-lr", "1e-3", "--student-lr", "1e-3"]


@pytest.fixture(scope="module")
def runs(glue_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    model = tiny_pretrained("bert", folder / "pretrained")
    assert main(_train_arguments(glue_dir, model, folder / "one")) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "sparsebert.cli", *_train_arguments(glue_dir, model, folder / "two")]
    finished = subprocess.run(torchrun, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-4000:]
    return model, folder / "one", folder / "two", finished.stdout


def _steps(stage):
    return json.loads((stage / "trainer_state.json").read_text())["global_step"]


def test_two_processes_take_the_global_batch_and_the_same_steps(runs):
    _, one, two, _ = runs
    # 64 examples, 16 a step: 4 steps an epoch; the teacher 1 epoch, the student 2.
    assert _steps(two / "teacher") == _steps(one / "teacher") == 4
    assert _steps(two / "student") == _steps(one / "student") == 8
    assert not list(two.parent.glob("two.partial*"))  # one run folder, written by rank 0 alone


def test_both_ranks_end_with_the_masks_the_saved_student_has(runs):
    from transformers import AutoModelForSequenceClassification

    from sparsebert.pipeline.distributed import masks_digest

    _, _, two, stdout = runs
    found = re.findall(r"pruning masks identical on all 2 ranks \(sha256 ([0-9a-f]{64})\)", stdout)
    assert len(found) == 1, stdout[-3000:]
    student = AutoModelForSequenceClassification.from_pretrained(two / "student")
    assert masks_digest(student, families.BERT.pruned_params()) == found[0]
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["student"]["encoder_linear_sparsity"] == pytest.approx(0.8, abs=0.01)


def test_the_two_process_student_is_close_to_the_one_process_student(runs):
    """Same global batches (in another order: each rank draws its half), so the students differ
    by data order only: far less than either moved from the pre-trained weights."""
    model, one, two, _ = runs
    start, a, b = (load_weights(folder) for folder in (model, one / "student", two / "student"))
    patterns = families.BERT.pruned_params()
    names = [n for n in a if is_pruned(n, patterns)]
    assert len(names) == 12
    moved = sum(float(np.square(a[n] - start[n.split(".", 1)[1]]).sum()) for n in names) ** 0.5
    apart = sum(float(np.square(a[n] - b[n]).sum()) for n in names) ** 0.5
    assert moved > 0 and apart < 0.5 * moved, (apart, moved)
    one_dev = json.loads((one / "metrics.json").read_text())["student"]["dev"]
    two_dev = json.loads((two / "metrics.json").read_text())["student"]["dev"]
    assert set(one_dev) == set(two_dev)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch, tmp_path, glue_dir, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code = main(_train_arguments(glue_dir, tiny_pretrained("bert", tmp_path / "model"), tmp_path / "run"))
    assert code == 2 and not (tmp_path / "run").exists()
    assert "--batch-size 16 does not split over 3 processes" in capsys.readouterr().err


def test_rank_0_failing_inside_a_stage_does_not_leave_the_others_waiting(monkeypatch):
    """Failing between stages, rank 0 tells the others to stop; failing inside one, it sends
    nothing (they are in the stage's collectives, not listening) and exits, and torchrun stops them."""
    from sparsebert.pipeline import distributed

    sent = []
    monkeypatch.setattr(distributed, "_handoff", object())
    monkeypatch.setattr(distributed, "_broadcast", sent.append)
    distributed.send_stage({"output_dir": "teacher"})
    distributed.finish(failed=True)
    assert sent == [{"output_dir": "teacher"}]  # nothing more: the others are training
    distributed.stage_done()
    distributed.finish(failed=True)
    assert sent == [{"output_dir": "teacher"}, None]


def test_only_train_runs_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["export", str(tmp_path)]) == 2
    assert "only `sparsebert train` runs under torchrun" in capsys.readouterr().err
