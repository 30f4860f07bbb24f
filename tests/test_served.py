"""What a client gets is what the model says: the real server, started on each engine, is sent
real dev rows over HTTP, and every answer (label and score) is compared with the PyTorch
checkpoint's, for a single-sentence task (SST-2), a pair task (MRPC) and the regression task
(STS-B). Each model is exported at 32 tokens, so the server must also truncate where export did."""

import json

import numpy as np
import pytest
from tiny import tiny_task_checkpoint

from sparsebert import glue
from sparsebert.cli import main
from sparsebert.deploy import thresholds
from sparsebert.deploy.engines import served_engines
from sparsebert.deploy.export import export_and_check
from sparsebert.deploy.parity import compare_answers, probability_margins, served_parity
from sparsebert.runfolder import RunFolder

ROWS = 40
LENGTH = 32  # below many dev rows (SST-2 included), so the server must truncate where export did


@pytest.fixture(scope="module", params=["sst2", "mrpc", "stsb"])
def exported(request, glue_dir, tmp_path_factory):
    task = glue.get_task(request.param)
    folder = tmp_path_factory.mktemp(f"served-{task.name}")
    # Pruned as a student is, so the sparse engines run their sparse kernels.
    checkpoint = tiny_task_checkpoint(task, folder / "checkpoint", sparsity=0.9)
    export_and_check(checkpoint, folder / "export", LENGTH, task=task)
    _, splits = glue.load_task(task.name, str(glue_dir))
    # The longest dev rows first: they are the ones truncated at the exported length.
    examples = sorted(splits["dev"], key=lambda e: -len(e["sentence1"] + e.get("sentence2", "")))[:ROWS // 2]
    examples += splits["dev"][:ROWS // 2]
    return task, checkpoint, folder / "export" / "deployment", examples


def test_served_answers_equal_pytorch_on_every_served_engine(exported, monkeypatch):
    from sparsebert.deploy import sparse_kernels

    task, checkpoint, deployment, examples = exported
    products, multiply = [], sparse_kernels.CSRMatrix.matmul_t
    monkeypatch.setattr(sparse_kernels.CSRMatrix, "matmul_t",
                        lambda self, *args, **kwargs: products.append(self.sparsity) or multiply(self, *args, **kwargs))
    report = served_parity(task, checkpoint, deployment, {"dev": examples}, thresholds.load()["parity"], LENGTH)
    # The sparse engine's server ran its kernel, on the pruned matrices (the server runs in this process).
    assert products and min(products) >= 0.85
    assert set(report["splits"]["dev"]) == set(served_engines()) >= {"deepsparse", "onnxruntime", "onnxruntime-sparse"}
    for engine in served_engines():
        result = report["splits"]["dev"][engine]
        assert result["answers"] == len(examples), result
        assert result["label_mismatches"] == 0 and result["ties_flipped"] == 0, result
        assert result["max_score_difference"] < 1e-3, result
        assert result["metric"] == pytest.approx(result["pytorch_metric"], abs=0.05)  # ranks of near-equal scores may swap
    assert report["passed"]


def test_regression_is_served_on_its_own_scale(exported):
    task, _, deployment, _ = exported
    config = json.loads((deployment / "config.json").read_text())
    serving = json.loads((deployment / "serving.json").read_text())
    assert serving == {"task": task.name, "text_inputs": len(task.text_columns),
                       "regression": task.is_regression, "sequence_length": LENGTH}
    if task.is_regression:
        assert config["id2label"] == {"0": "similarity"} and config["problem_type"] == "regression"


def test_comparison_catches_a_sigmoid_and_a_flipped_label():
    logits = np.array([[2.0, -1.0], [0.1, 0.1005], [-3.0, 1.0]])
    expected = (["a", "b", "b"], [0.95, 0.5001, 0.98])
    margins = probability_margins(logits)
    assert compare_answers(expected, expected, margins, 1e-3)["passed"]
    tie_flipped = (["a", "a", "b"], [0.95, 0.5001, 0.98])
    assert compare_answers(expected, tie_flipped, margins, 1e-3)["passed"]  # row 1 is a tie
    flipped = (["b", "b", "b"], [0.95, 0.5001, 0.98])
    assert not compare_answers(expected, flipped, margins, 1e-3)["passed"]
    regression = (["similarity"] * 2, [3.7, 0.4])
    sigmoid = (["similarity"] * 2, [float(1 / (1 + np.exp(-3.7))), float(1 / (1 + np.exp(-0.4)))])
    result = compare_answers(regression, sigmoid, np.full(2, np.inf), 1e-3)
    assert not result["passed"] and result["max_score_difference"] > 2
    assert not compare_answers(regression, (["similarity"], [3.7]), np.full(2, np.inf), 1e-3)["passed"]


def test_parity_served_command_writes_a_report_the_gates_read(exported_run):
    """`sparsebert parity --served` on the tiny RTE run: every served engine, every dev row."""
    from sparsebert.deploy import gates

    assert main(["parity", str(exported_run), "--served"]) == 0
    path = exported_run / "parity-served-student.json"
    measured = path.read_text()
    report = json.loads(measured)
    assert set(report["splits"]["dev"]) == {"deepsparse", "onnxruntime", "onnxruntime-sparse"}
    assert all(r["answers"] == 48 for r in report["splits"]["dev"].values())
    limits = thresholds.load()["parity"]
    served = {g.name: g.passed for g in gates.served_parity_gates(RunFolder(exported_run), "student", limits)}
    assert served == {f"served answers student {e} (dev)": True
                      for e in ("deepsparse", "onnxruntime", "onnxruntime-sparse")}
    report["splits"]["dev"]["onnxruntime"]["max_score_difference"] = 0.01
    path.write_text(json.dumps(report))
    try:
        served = {g.name: g.passed for g in gates.served_parity_gates(RunFolder(exported_run), "student", limits)}
        assert served["served answers student onnxruntime (dev)"] is False
    finally:
        path.write_text(measured)  # the measured report, for the other tests
