"""Export (sparsity read back from ONNX, outputs vs PyTorch), parity across engines, the
benchmark's ratios and the CI gates."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sparsebert.cli import main
from sparsebert.deploy import bench, gates, thresholds
from sparsebert.deploy.engines import served_engines
from sparsebert.deploy.export import onnx_sparsity


def test_export_keeps_zeros_and_labels(exported_run):
    report = json.loads((exported_run / "export" / "student" / "export.json").read_text())
    assert report["sparsity_matches_checkpoint"]
    assert report["onnx_encoder_linear_sparsity"] == pytest.approx(0.9, abs=0.005)
    assert report["max_logit_difference"] < 1e-3
    deployment = exported_run / "export" / "student" / "deployment"
    config = json.loads((deployment / "config.json").read_text())
    assert set(config["id2label"].values()) == {"entailment", "not_entailment"}
    assert (deployment / "tokenizer.json").is_file()
    teacher = json.loads((exported_run / "export" / "teacher" / "export.json").read_text())
    assert teacher["onnx_encoder_linear_sparsity"] < 0.01


def test_sparsity_check_notices_a_dense_onnx(exported_run, tmp_path):
    """Swap the teacher's (dense) ONNX in: reading it back must not match the student."""
    from sparsebert.deploy.export import ExportError

    dense_onnx = exported_run / "export" / "teacher" / "deployment" / "model.onnx"
    with pytest.raises(ExportError, match="not found unchanged"):
        onnx_sparsity(exported_run / "student", dense_onnx)


def test_parity_report_across_engines(exported_run):
    assert main(["parity", str(exported_run)]) == 0
    report = json.loads((exported_run / "parity-student.json").read_text())
    (split,) = report["splits"].values()
    assert set(split["metrics"]) == {"pytorch", "onnxruntime", "deepsparse", "onnxruntime-sparse", "pytorch-csr"}
    assert split["examples"] == 48
    for engine in ("onnxruntime", "deepsparse", "pytorch-csr"):
        assert split["against_pytorch"][engine]["max_logit_difference"] < 1e-3
    assert split["against_pytorch"]["onnxruntime-sparse"]["max_logit_difference"] < 1e-4  # issue #20's bar
    assert report["passed"] and report["sequence_length"] == 128


def test_parity_fails_past_a_tight_threshold(exported_run, tmp_path):
    strict = tmp_path / "strict.yaml"
    strict.write_text("parity:\n  max_logit_difference: 0.0\n")
    assert main(["parity", str(exported_run), "--thresholds", str(strict)]) == 1
    assert json.loads((exported_run / "parity-student.json").read_text())["passed"] is False
    assert main(["parity", str(exported_run)]) == 0  # leave the passing report for the gates


def test_thresholds_file_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("parity:\n  max_logit_diff: 1\n")
    with pytest.raises(thresholds.ThresholdError, match="unknown key parity.max_logit_diff"):
        thresholds.load(bad)


def test_ratios_are_sparse_over_dense_per_thread_count():
    speeds = [("dense", "onnxruntime", 10.0), ("dense", "deepsparse", 12.0), ("dense", "pytorch", 5.0),
              ("sparse 90%", "deepsparse", 40.0), ("sparse 90%", "onnxruntime", 11.0)]
    rows = [{"family": "m", "variant": v, "engine": e, "batch_size": 1, "threads": t, "items_per_second": s * t}
            for v, e, s in speeds for t in (1, 2)]
    rows += [{"family": "m", "variant": "sparse 90% INT8", "precision": "int8", "engine": "deepsparse", "batch_size": 1,
              "threads": 1, "items_per_second": 80.0}]
    one, two, int8 = bench.ratios(rows)
    assert (one["family"], one["variant"], one["batch_size"], one["threads"]) == ("m", "sparse 90%", 1, 1)
    assert one["sparse_deepsparse_vs_dense_onnxruntime"] == pytest.approx(4.0)
    assert one["sparse_vs_dense_deepsparse"] == pytest.approx(40 / 12)
    assert one["sparse_deepsparse_vs_dense_pytorch"] == pytest.approx(8.0)
    assert one["sparse_vs_dense_onnxruntime"] == pytest.approx(1.1)
    assert two["threads"] == 2 and two["sparse_deepsparse_vs_dense_onnxruntime"] == pytest.approx(4.0)
    assert int8["precision"] == "int8" and int8["sparse_int8_deepsparse_vs_dense_onnxruntime"] == pytest.approx(8.0)
    assert "sparse_deepsparse_vs_dense_onnxruntime" not in int8


def test_measurements_are_interleaved_round_robin():
    """Model after model put every dense figure before every sparse one on a drifting machine;
    each configuration now gets a turn in every round."""
    calls = []
    timed = [bench.Timed({"family": "m", "variant": v, "engine": "e", "batch_size": 1, "threads": 1},
                         lambda v=v: calls.append(v), 1) for v in ("dense", "sparse")]
    bench.measure_interleaved(timed, seconds=0.0, rounds=3, progress=lambda line: None)
    assert calls == ["dense", "sparse"] + ["dense", "sparse"] * 3  # warm-up, then three rounds


def test_real_text_pads_to_the_longest_bucket_or_picks_the_smallest(exported_run, monkeypatch):
    """Padded requests all run at the exported length; bucketed ones each on the smallest bucket
    that holds the text; each configuration times whole passes over the same texts."""
    from sparsebert.runfolder import RunFolder

    runners = []

    class Recording:
        def __init__(self, engine, model_dir, deployment, batch_size, sequence_length, threads=None):
            self.length, self.tokens = sequence_length, []
            runners.append(self)

        def __call__(self, inputs):
            assert inputs["input_ids"].shape == (1, self.length)
            self.tokens.append(int(inputs["attention_mask"].sum()))

        def close(self):
            pass

    monkeypatch.setattr(bench, "Runner", Recording)
    run = RunFolder(exported_run)
    examples = run.examples("dev")[:20]
    model = bench.Model("m", "sparse", run.checkpoint("student"), run.deployment("student"))
    report = bench.real_text_benchmark([model], examples, [64, 128], seconds=0.0, engines=["onnxruntime"],
                                       progress=lambda line: None)
    padded, *bucketed = runners  # created in that order: the padded runner, then one per bucket
    assert padded.length == 128 and [r.length for r in bucketed] == [64, 128]
    assert bucketed[0].tokens and bucketed[1].tokens  # RTE's pairs fall on both sides of 64 tokens
    assert all(n <= 64 for n in bucketed[0].tokens) and all(n > 64 for n in bucketed[1].tokens)
    assert sorted(padded.tokens[1:]) == sorted(bucketed[0].tokens[1:] + bucketed[1].tokens[1:])  # the same texts
    rows = {r["input"]: r for r in report["rows"]}
    assert rows["padded"]["iterations"] == rows["bucketed"]["iterations"] == 3 * len(examples)  # whole passes


def test_bucket_of_picks_the_smallest_that_holds():
    assert [bench.bucket_of(n, [128, 32, 64]) for n in (5, 32, 33, 64, 65, 500)] == [32, 32, 64, 64, 128, 128]


def test_bench_measures_and_plots(exported_run):
    assert main(["bench", str(exported_run), "--batch-sizes", "1", "--seconds", "0.2", "--threads", "1",
                 "--real-text", "12", "--buckets", "32", "128"]) == 0
    report = json.loads((exported_run / "bench" / "bench.json").read_text())
    assert {r["engine"] for r in report["rows"]} == {"pytorch", "onnxruntime", "deepsparse", "onnxruntime-sparse",
                                                     "pytorch-csr"}
    assert {r["variant"] for r in report["rows"] if r["engine"] in ("onnxruntime-sparse", "pytorch-csr")} == {"sparse 90%"}
    assert {r["threads"] for r in report["rows"]} == {1}  # 1 and all: tests/test_engines.py
    assert all(r["items_per_second"] > 0 and r["iterations"] >= 3 for r in report["rows"])
    assert "sparse_deepsparse_vs_dense_onnxruntime" in report["ratios"][0]
    real = report["real_text"]
    assert real["examples"] == 12 and real["buckets"] == [32, 128]
    assert {r["threads"] for r in real["rows"]} == {1}  # --threads reaches the real-text pass
    assert {(r["input"], r["engine"]) for r in real["rows"]} == {
        (i, e) for i in ("padded", "bucketed") for e in ("onnxruntime", "deepsparse", "onnxruntime-sparse")}
    assert (exported_run / "bench" / "bench.png").stat().st_size > 10_000
    text = (exported_run / "bench" / "bench.md").read_text()
    assert "| sparse DS / dense ORT |" in text and "Real text: 12 dev examples" in text


# Copies of a run keep its reports and the student's recipe.yaml, not the weights or the data.
WEIGHTS_AND_DATA = shutil.ignore_patterns("export", "teacher", "data", "*.safetensors", "*.pt", "*.bin", "*.json.gz")


def _edit(path, change):
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))


def _copy(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=WEIGHTS_AND_DATA)
    served = run / "parity-served-student.json"
    if not served.is_file():  # measured by tests/test_served.py (after these); the gates only read it
        answer = {"answers": 48, "label_mismatches": 0, "ties_flipped": 0, "max_score_difference": 0.0}
        served.write_text(json.dumps({"splits": {"dev": {e: answer for e in served_engines()}}}))
    return run


def _gates(run):
    return {g.name: g.passed for g in gates.check(run, thresholds.load())}


def test_gates_pass_and_fail_on_the_reports(exported_run, tmp_path):
    run = _copy(exported_run, tmp_path)

    def learned(m):  # a student that learned: 10 points over the baseline, 98% of the teacher
        baseline = m["baseline"]["dev"]["accuracy"]
        m["student"]["dev"]["dev"]["accuracy"], m["teacher"]["dev"]["dev"]["accuracy"] = baseline + 10, (baseline + 10) / 0.98

    def fast(r):
        for ratios in r["ratios"]:
            ratios["sparse_deepsparse_vs_dense_onnxruntime"], ratios["sparse_vs_dense_deepsparse"] = 3.0, 2.0

    _edit(run / "metrics.json", learned)
    _edit(run / "bench" / "bench.json", fast)
    assert main(["gates", str(run)]) == 0

    _edit(run / "bench" / "bench.json", lambda r: r["ratios"][0].update(sparse_deepsparse_vs_dense_onnxruntime=1.2))
    assert main(["gates", str(run)]) == 1
    names = _gates(run)
    threads = json.loads((run / "bench" / "bench.json").read_text())["ratios"][0]["threads"]
    assert names[f"speed all-MiniLM-L6-v2 (rte) sparse 90% sparse_deepsparse_vs_dense_onnxruntime ({threads} thread(s))"] is False
    assert names["parity student deepsparse (dev)"] is True
    _edit(run / "bench" / "bench.json", fast)

    # Parity is judged from the measured differences against today's thresholds, not a stored verdict.
    deepsparse = lambda r: r["splits"]["dev"]["against_pytorch"]["deepsparse"]  # noqa: E731
    _edit(run / "parity-student.json", lambda r: deepsparse(r).update(passed=False))
    assert _gates(run)["parity student deepsparse (dev)"] is True
    _edit(run / "parity-student.json", lambda r: deepsparse(r).update(max_logit_difference=0.5))
    assert _gates(run)["parity student deepsparse (dev)"] is False
    # A dev split the parity run left out (MNLI's mismatched, say) fails.
    _edit(run / "parity-student.json", lambda r: r.update(splits={}))
    assert _gates(run)["parity student"] is False

    # The served answers are required: every split, every served engine, none wrong.
    _edit(run / "parity-served-student.json", lambda r: r["splits"]["dev"].pop("onnxruntime"))
    assert _gates(run)["served answers student onnxruntime (dev)"] is False
    (run / "parity-served-student.json").unlink()
    with pytest.raises(gates.MissingReport, match="--served"):
        _gates(run)
    (run / "parity-student.json").write_text(json.dumps({"against_pytorch": {}}))  # an older format
    with pytest.raises(gates.MissingReport, match="older sparsebert"):
        _gates(run)


def test_gates_guard_the_accuracy_claim(exported_run, tmp_path):
    """A student that does not beat the majority baseline, or keeps too little of the teacher,
    fails the gates, whatever its speed and parity (today's untrained student did)."""
    run = _copy(exported_run, tmp_path)
    at_baseline = lambda m: m["student"]["dev"]["dev"].update(accuracy=m["baseline"]["dev"]["accuracy"])  # noqa: E731
    _edit(run / "metrics.json", at_baseline)
    names = _gates(run)
    assert names["student beats the majority baseline (dev)"] is False
    _edit(run / "metrics.json", lambda m: m["teacher"]["dev"]["dev"].update(accuracy=m["student"]["dev"]["dev"]["accuracy"] * 1.5))
    assert _gates(run)["student retention of the teacher (dev)"] is False
    assert main(["gates", str(run)]) == 1


def test_gates_fail_a_missing_speed_row(exported_run, tmp_path):
    run = _copy(exported_run, tmp_path)
    _edit(run / "bench" / "bench.json", lambda r: r.update(ratios=[x for x in r["ratios"] if x["batch_size"] != 1]))
    assert _gates(run)["speed at batch 1"] is False


def _edit_recipe(recipe, old, new):
    """Edit the student's recipe on purpose: its manifest, which would refuse the edit, is
    written again to vouch for it."""
    from sparsebert import atomic

    recipe.write_text(recipe.read_text().replace(old, new))
    atomic.write_manifest(recipe.parent, "train")


def test_sparsity_gate_reads_the_students_recipe(exported_run, tmp_path):
    run = _copy(exported_run, tmp_path)
    assert _gates(run)["student sparsity"] is True
    recipe = run / "student" / "recipe.yaml"
    _edit_recipe(recipe, "final_sparsity: 0.9", "final_sparsity: 0.95")
    assert _gates(run)["student sparsity"] is False  # the matrices hold 90%, the recipe says 95%
    _edit(run / "metrics.json", lambda m: m["student"]["per_matrix_sparsity"].update({"bert.pooler.dense.weight": 0.95}))
    _edit_recipe(recipe, "final_sparsity: 0.95", "final_sparsity: 0.9")
    assert _gates(run)["student sparsity"] is False  # a measured matrix no modifier prunes


def test_sparsity_gate_judges_a_global_ranking_as_a_whole(exported_run, tmp_path):
    run = _copy(exported_run, tmp_path)
    recipe = run / "student" / "recipe.yaml"
    assert "global_sparsity: False" in recipe.read_text()
    uneven = lambda m: m["student"]["per_matrix_sparsity"].update(  # noqa: E731
        {n: 0.8 for n in list(m["student"]["per_matrix_sparsity"])[:3]})
    _edit(run / "metrics.json", uneven)  # overall still 90%, as a global ranking leaves it
    assert _gates(run)["student sparsity"] is False
    _edit_recipe(recipe, "global_sparsity: False", "global_sparsity: True")
    assert _gates(run)["student sparsity"] is True
    _edit(run / "metrics.json", lambda m: m["student"].update(encoder_linear_sparsity=0.85))
    assert _gates(run)["student sparsity"] is False


def test_gates_need_the_reports(tmp_path, capsys):
    assert main(["gates", str(tmp_path)]) == 2
    assert "metrics.json not found" in capsys.readouterr().err


def test_onnx_initializers_hold_the_zeros(exported_run):
    model = onnx.load(str(exported_run / "export" / "student" / "deployment" / "model.onnx"))
    sparse = [a for a in map(numpy_helper.to_array, model.graph.initializer)
              if a.ndim == 2 and a.size >= 384 * 384 and (a == 0).mean() > 0.85]
    assert len(sparse) == 36  # the six pruned linears of each of the six layers, zeros stored


def test_pytorch_runners_set_their_own_thread_count(exported_run):
    """torch's thread count is process-wide: an all-cores runner after a 1-thread one must not run on 1."""
    import torch

    from sparsebert.deploy.engines import Runner
    from sparsebert.hardware import physical_cores

    deployment = exported_run / "export" / "student" / "deployment"
    Runner("pytorch", exported_run / "student", deployment, 1, 128, threads=1)
    assert torch.get_num_threads() == 1
    Runner("pytorch-csr", exported_run / "student", deployment, 1, 128)
    assert torch.get_num_threads() == physical_cores()


def test_csr_engine_runs_the_pruned_linears_sparse(exported_run):
    import torch

    from sparsebert.deploy.bench import random_inputs
    from sparsebert.deploy.engines import Runner

    deployment = exported_run / "export" / "student" / "deployment"
    dense, csr = (Runner(e, exported_run / "student", deployment, 2, 128, threads=1) for e in ("pytorch", "pytorch-csr"))
    layouts = {m.weight.layout for m in csr.backend.model.modules() if hasattr(m, "weight") and m.weight.dim() == 2}
    assert torch.sparse_csr in layouts  # the 36 pruned linears; embeddings, pooler, classifier stay dense
    inputs = random_inputs(dense.input_names, 2, 128)
    np.testing.assert_allclose(csr(inputs), dense(inputs), atol=1e-4)


def test_speed_floor_is_capped_by_the_students_flop_bound(exported_run, tmp_path):
    """An 80% student (FLOP bound 4x) is held to 40% of that bound, 1.6x, not the 2x set for 90-95%;
    a 95% one (bound 9x) to the full floor."""
    run = _copy(exported_run, tmp_path)
    name = "sparse_deepsparse_vs_dense_onnxruntime"

    def judged(bound, ratio, in_bench=True, in_metrics=None):
        metrics_bound = bound if in_metrics is None else in_metrics
        _edit(run / "metrics.json", lambda m: m["student"]["flops"].update(encoder_flops_reduction=metrics_bound))
        _edit(run / "bench" / "bench.json", lambda r: [row.update({name: ratio, "sparse_vs_dense_deepsparse": 9.0,
                                                                   "flop_bound": bound if in_bench else None})
                                                      for row in r["ratios"]])
        return [g for g in gates.check(run, thresholds.load()) if g.name.startswith("speed") and name in g.name]

    assert all(g.passed and "floor 1.6x" in g.detail for g in judged(4.0, 1.7))
    assert not any(g.passed for g in judged(4.0, 1.5))
    assert not any(g.passed for g in judged(9.0, 1.7))  # the 2x floor holds for a sparser student
    assert all(g.passed and "floor 2.0x" in g.detail for g in judged(9.0, 2.1))
    assert all(g.passed and "floor 1.6x" in g.detail for g in judged(4.0, 1.7, in_metrics=9.0))  # the row's own bound
    assert all(g.passed and "floor 1.6x" in g.detail for g in judged(4.0, 1.7, in_bench=False))  # an older bench.json
