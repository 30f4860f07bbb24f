"""The INT8 student (`sparsebert train --int8`): quantization-aware training that holds the
student's zeros and moves its weights, checkpoint readers that rebuild the quantized structure
or refuse, the INT8 ONNX export (zeros kept, integer MatMuls, engines close to PyTorch), parity
and the INT8 gates."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sparsebert.checkpoint import is_pruned, is_quantized, load_weights, pruned_patterns
from sparsebert.cli import main
from sparsebert.deploy import gates, thresholds
from sparsebert.deploy.engines import served_engines
from sparsebert.inference import InferenceError, load_classifier
from sparsebert.runfolder import INT8


@pytest.fixture(scope="module")
def int8_run(glue_dir, tmp_path_factory):
    """48 RTE examples: teacher, a 90% student, one epoch of QAT; then the export."""
    run = tmp_path_factory.mktemp("int8") / "rte"
    assert main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(run), "--limit", "48",
                 "--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "16", "--max-seq-length", "64",
                 "--sparsity", "0.9", "--int8", "--int8-epochs", "1", "--int8-lr", "1e-4"]) == 0
    assert main(["export", str(run), "--max-seq-length", "64"]) == 0
    return run


def test_qat_holds_the_zeros_and_moves_the_kept_weights(int8_run):
    metrics = json.loads((int8_run / "metrics.json").read_text())
    assert is_quantized(int8_run / INT8) and not is_quantized(int8_run / "student")
    student, int8 = load_weights(int8_run / "student"), load_weights(int8_run / INT8)
    assert set(int8) == set(student)  # plain names, no quantization state
    patterns = pruned_patterns(int8_run / "student")
    pruned = [n for n in student if is_pruned(n, patterns)]
    assert len(pruned) == 36
    for name in pruned:
        assert np.array_equal(int8[name] == 0, student[name] == 0), name  # the same zeros, held
    assert metrics[INT8]["encoder_linear_sparsity"] == pytest.approx(0.9, abs=0.005)
    assert metrics[INT8]["kept_weights_moved"] > 0.5  # moved from the FP32 student it started from
    assert metrics[INT8]["curve"]["applied_learning_rate_max"] > 0
    assert metrics["int8_cost_points"] == pytest.approx(
        metrics["student"]["dev"]["dev"]["accuracy"] - metrics[INT8]["dev"]["dev"]["accuracy"])


def test_reader_rebuilds_the_quantized_linears(int8_run):
    from torch.ao.quantization import QuantWrapper

    model = load_classifier(int8_run / INT8)
    linear = model.bert.encoder.layer[0].output.dense
    assert isinstance(linear, QuantWrapper)
    assert int(linear.module.weight_fake_quant.observer_enabled[0]) == 0  # evaluating never moves a scale
    saved = load_weights(int8_run / INT8)["bert.encoder.layer.0.output.dense.weight"]
    assert np.array_equal(linear.module.weight.detach().numpy(), saved)  # loaded, not re-initialised


def test_reader_refuses_a_quantized_checkpoint_it_cannot_rebuild(int8_run, tmp_path):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(int8_run / INT8, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["bert.encoder.layer.0.output.dense.module.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InferenceError, match="missing"):
        load_classifier(broken)
    (broken / "recipe.yaml").unlink()
    with pytest.raises(InferenceError, match="no recipe.yaml"):
        load_classifier(broken)


def test_int8_export_is_integer_sparse_and_close_to_pytorch(int8_run):
    from sparsebert.deploy.engines import Runner
    from sparsebert.deploy.bench import random_inputs

    report = json.loads((int8_run / "export" / INT8 / "export.json").read_text())
    assert report["precision"] == "int8" and report["sparsity_matches_checkpoint"]
    assert report["onnx_encoder_linear_sparsity"] >= 0.9 - 1e-6
    deployment = int8_run / "export" / INT8 / "deployment"
    integer = [n.name for n in onnx.load(str(deployment / "model.onnx")).graph.node if n.op_type == "MatMulInteger"]
    assert sum("/module/" in n for n in integer) >= 36  # every pruned linear runs on integers
    assert sum("_matmul/" in n for n in integer) == 12  # and both attention matmuls of every layer
    fp32 = json.loads((int8_run / "export" / "student" / "export.json").read_text())
    assert fp32["precision"] == "fp32" and "MatMulInteger" not in [
        n.op_type for n in onnx.load(str(int8_run / "export" / "student" / "deployment" / "model.onnx")).graph.node]
    logits = {}
    for engine in ("pytorch", "onnxruntime", "deepsparse"):
        runner = Runner(engine, int8_run / INT8, deployment, 4, 64, 1)
        logits[engine] = runner(random_inputs(runner.input_names, 4, 64))
        runner.close()
    for engine in ("onnxruntime", "deepsparse"):
        assert np.abs(logits[engine] - logits["pytorch"]).max() < 0.1


def test_int8_profile_counts_integer_linears_and_their_quantization_as_encoder_linears(int8_run):
    """Each pruned linear's MatMulInteger, and the QuantizeLinear of its input, are encoder linears
    (an attention matmul's, attention matmuls);
    on ONNX Runtime, which moves those QuantizeLinears above the attention's Transpose and renames
    them, every kernel still traces to a node of the graph, and the categories sum to the pass."""
    from sparsebert.deploy import profile

    path = int8_run / "export" / INT8 / "deployment" / "model.onnx"
    nodes = onnx.load(str(path)).graph.node
    graph = profile.Graph.read(path, pruned_patterns(int8_run / INT8))
    integer = [n for n in nodes if n.op_type == "MatMulInteger" and "/module/" in n.name and "/pooler/" not in n.name]
    assert len(integer) == 36 and all(graph.category[n.name] == "encoder_linears" for n in integer)
    quantized = {n.name for n in nodes if n.op_type == "QuantizeLinear" and graph.category[n.name] == "encoder_linears"}
    assert len(quantized) == 24  # one input per layer for q, k and v together, one for each of the other three
    attention = [n for n in nodes if n.op_type == "MatMulInteger" and "_matmul/" in n.name]
    assert len(attention) == 12 and all(graph.category[n.name] == "attention_matmuls" for n in attention)
    (row,) = profile.profile_model(profile.Target("sparse 90% INT8", int8_run / INT8, path.parent), 64, passes=3,
                                   engines=["onnxruntime"])
    assert sum(row["ms"].values()) == pytest.approx(row["total_ms"])
    moved = [k for k in row["kernels"] if k["name"].endswith("_q") and k["name"] not in graph.category]
    # each is its matmul's cost: a linear's input, or an attention matmul's operand
    assert moved and all(k["category"] == ("attention_matmuls" if "_matmul/" in k["nodes"][0] else "encoder_linears")
                         for k in moved)


def test_int8_sparsity_readback_notices_a_lost_zero(int8_run, tmp_path):
    from sparsebert.deploy.export import ExportError, int8_onnx_sparsity, pruned_weights

    model = onnx.load(str(int8_run / "export" / INT8 / "deployment" / "model.onnx"))
    init = next(t for t in model.graph.initializer if t.name.endswith("layer.0/output/dense/module/MatMul.weight_quantized"))
    values = numpy_helper.to_array(init).copy()
    zero_point = values.flat[np.argmax(np.bincount(values.ravel()))]  # the most frequent value: the zeros
    values[values == zero_point] = zero_point + 1  # every zero lost
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match="not all zeros"):
        int8_onnx_sparsity(path, pruned_weights(int8_run / "student"))


def test_int8_parity_and_gates(int8_run, tmp_path):
    assert main(["parity", str(int8_run), "--checkpoint", INT8]) == 0
    report = json.loads((int8_run / f"parity-{INT8}.json").read_text())
    limits = thresholds.parity_limits(thresholds.load(), INT8)
    assert report["thresholds"]["max_logit_difference"] == limits["max_logit_difference"] == 0.5
    assert limits["max_served_score_difference"] == 1e-3
    assert thresholds.parity_limits(thresholds.load(), "student")["max_served_score_difference"] == 1e-3

    run = tmp_path / "run"
    shutil.copytree(int8_run, run, ignore=shutil.ignore_patterns("export", "*.safetensors", "*.pt"))
    answer = {"answers": 48, "label_mismatches": 0, "ties_flipped": 0, "max_score_difference": 0.0}
    for which in ("student", INT8):  # the gates only read these; other tests measure them
        served = {"splits": {"dev": {e: answer for e in served_engines(int8=which == INT8)}}}
        (run / f"parity-served-{which}.json").write_text(json.dumps(served))
    shutil.copyfile(run / f"parity-{INT8}.json", run / "parity-student.json")
    metrics = json.loads((run / "metrics.json").read_text())
    student = metrics["student"]["dev"]["dev"]["accuracy"]

    def deployed_int8(accuracy, engine="deepsparse"):  # what the INT8 graph scores on an engine
        parity = json.loads((run / f"parity-{INT8}.json").read_text())
        parity["splits"]["dev"]["metrics"][engine]["accuracy"] = accuracy
        (run / f"parity-{INT8}.json").write_text(json.dumps(parity))

    deployed_int8(student - 0.5)
    deployed_int8(student, engine="onnxruntime")
    rows = [{"family": "m", "variant": v, "precision": p, "batch_size": 1, "threads": 1,
             f"{'sparse_int8' if p == 'int8' else 'sparse'}_deepsparse_vs_dense_onnxruntime": 2.5,
             f"{'sparse_int8' if p == 'int8' else 'sparse'}_vs_dense_deepsparse": 2.0}
            for v, p in (("sparse 90%", "fp32"), ("sparse 90% INT8", "int8"))]
    bench = {"machine": {"cpu": "test CPU", "cpu_features": ["avx2", "avx512_vnni"]}, "ratios": rows}
    (run / "bench").mkdir(exist_ok=True)
    (run / "bench" / "bench.json").write_text(json.dumps(bench))

    def judged():
        return {g.name: g for g in gates.check(run, thresholds.load())}

    found = judged()
    assert found["INT8 student against the FP32 student (dev)"].passed
    assert found[f"{INT8} sparsity"].passed
    served = {name: g.passed for name, g in found.items() if name.startswith("served answers")}
    assert served == {f"served answers {which} {e} (dev)": True
                      for which in ("student", INT8) for e in served_engines(int8=which == INT8)}
    assert not found["speed m sparse 90% INT8 sparse_int8_deepsparse_vs_dense_onnxruntime (1 thread(s))"].passed
    metrics[INT8]["dev"]["dev"]["accuracy"] = student  # PyTorch's emulation is not what is judged
    (run / "metrics.json").write_text(json.dumps(metrics))
    deployed_int8(student - 1.5, engine="onnxruntime")
    bench["machine"]["cpu_features"] = ["avx2"]  # DeepSparse emulates INT8 here: not judged, and said so
    (run / "bench" / "bench.json").write_text(json.dumps(bench))
    found = judged()
    assert not found["INT8 student against the FP32 student (dev)"].passed
    assert "onnxruntime" in found["INT8 student against the FP32 student (dev)"].detail  # the worst engine
    speed = found["speed m sparse 90% INT8 sparse_int8_deepsparse_vs_dense_onnxruntime (1 thread(s))"]
    assert speed.passed and "not judged" in speed.detail
    bench["ratios"] = rows[:1]  # the INT8 row left out
    (run / "bench" / "bench.json").write_text(json.dumps(bench))
    assert not judged()["speed INT8 student"].passed


def test_bucketed_onnxruntime_runner_matches_the_full_length(int8_run):
    """A short text on a 32-token copy of the 64-token graph answers as it does padded to 64."""
    from transformers import AutoTokenizer

    from sparsebert import inference
    from sparsebert.deploy.engines import Runner

    deployment = int8_run / "export" / "student" / "deployment"
    tokenizer = AutoTokenizer.from_pretrained(deployment)
    names = inference.onnx_input_names(deployment / "model.onnx")
    example = [{"sentence1": "A man is playing a guitar.", "sentence2": "A man plays music."}]
    outputs = {}
    for length in (32, 64):
        runner = Runner("onnxruntime", int8_run / "student", deployment, 1, length)
        outputs[length] = runner(inference.encode(tokenizer, example, names, length, fixed_length=True))
        runner.close()
    assert np.abs(outputs[32] - outputs[64]).max() < 1e-4


def test_int8_server_answers_as_onnxruntime_does(int8_run):
    assert main(["parity", str(int8_run), "--checkpoint", INT8, "--served"]) == 0
    report = json.loads((int8_run / f"parity-served-{INT8}.json").read_text())
    assert report["reference"] == "engine"
    for engine in ("deepsparse", "onnxruntime"):
        result = report["splits"]["dev"][engine]
        assert result["answers"] == 48 and result["label_mismatches"] == 0


def test_loadtest_drives_every_served_model_over_http(int8_run):
    assert main(["loadtest", str(int8_run), "--clients", "1", "2", "--seconds", "1", "--examples", "6"]) == 0
    report = json.loads((int8_run / "bench" / "loadtest.json").read_text())
    rows = report["rows"]
    assert [(r["variant"], r["clients"]) for r in rows] == [
        (v, c) for v in ("dense", "sparse 90%", "sparse 90% INT8") for c in (1, 2)]
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["mismatches"] == 0 for r in rows)
    dense = [r for r in rows if r["variant"] == "dense"]
    assert all(r["engine"] == "onnxruntime" and r["sequence_lengths"] == [64] for r in dense)
    assert rows[2]["sequence_lengths"] == [32, 64]  # the sparse servers bucket
    assert "| dense | onnxruntime | [64] | 1 |" in (int8_run / "bench" / "loadtest.md").read_text()


def test_int8_recipe_holds_the_students_matrices_plain_or_wrapped():
    from sparsebert.recipe import check_recipe, recipe_path

    modifiers = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert-int8"), {})}
    assert {"ConstantPruningModifier", "QuantizationModifier", "SparseBertDistillationModifier"} <= set(modifiers)
    held = modifiers["ConstantPruningModifier"].params
    for name in ("bert.encoder.layer.3.attention.self.key.weight", "bert.encoder.layer.3.attention.self.key.module.weight",
                 "bert.encoder.layer.5.output.dense.module.weight"):
        assert is_pruned(name, held), name
    assert not is_pruned("bert.pooler.dense.weight", held)


def test_int8_flags_are_checked_before_training(tmp_path, capsys):
    assert main(["train", "--task", "rte", "--out", str(tmp_path / "r"), "--int8-epochs", "1"]) == 2
    assert "--int8-epochs needs --int8" in capsys.readouterr().err
    assert main(["train", "--task", "rte", "--out", str(tmp_path / "r"), "--int8", "--int8-lr", "0"]) == 2
    assert "--int8-lr must be positive" in capsys.readouterr().err
    assert main(["train", "--task", "rte", "--out", str(tmp_path / "r"), "--int8-recipe-args", '{"observer_end_fraction": 0.3}']) == 2
    assert "--int8-recipe-args needs --int8" in capsys.readouterr().err
    assert main(["train", "--task", "rte", "--out", str(tmp_path / "r"), "--int8", "--int8-recipe-args",
                 '{"final_sparsity": 0.9}']) == 2  # a student recipe's variable, not the INT8 recipe's
    assert "unknown recipe variable(s) ['final_sparsity']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_int8_recipe_args_reach_the_int8_stage_beside_the_carried_loss_weights(glue_dir, tmp_path):
    from sparsebert.pipeline.request import TrainRequest, plan

    linears_only = ["LayerNorm", "Embedding", "QATMatMul"]
    *_, int8_cfg = plan(TrainRequest(task="rte", glue_dir=str(glue_dir), out=tmp_path / "r", int8=True,
                                     recipe_args={"hidden_weight": 2.0},
                                     int8_recipe_args={"not_quantized": linears_only}))
    assert int8_cfg.recipe_args == {"hidden_weight": 2.0, "not_quantized": linears_only}


@pytest.mark.parametrize("attention", [True, False], ids=["linears-and-attention", "linears-only"])
def test_a_random_pruned_model_is_made_int8_without_training(tmp_path, attention):
    """`bench --bert-base`'s INT8 rows: the INT8 recipe's quantization applied to a random pruned
    model and its scales observed, then exported as a trained INT8 student is: an integer graph
    whose linears keep every zero, its logits those of PyTorch's fake quantization. The attention
    matmuls run on integers too, unless the recipe's not_quantized names QATMatMul (the checkpoint
    then still loads: its attention was rewritten, with nothing quantized in it)."""
    import torch
    from tiny import tiny_task_checkpoint

    from sparsebert import glue
    from sparsebert.deploy import bench
    from sparsebert.deploy.export import export_and_check

    source = tiny_task_checkpoint(glue.get_task("rte"), tmp_path / "fp32")
    model = load_classifier(source)
    patterns = pruned_patterns()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_pruned(name, patterns):
                param.mul_(param.abs() > param.abs().flatten().median())
    model.save_pretrained(source)
    bench.quantized_copy(source, tmp_path / "int8", sequence_length=32, batches=2,
                         recipe_args=None if attention else bench.int8_linears_only())
    assert is_quantized(tmp_path / "int8")
    report = export_and_check(tmp_path / "int8", tmp_path / "export", 32, max_logit_difference=1e-2)
    assert report["precision"] == "int8" and report["sparsity_matches_checkpoint"]  # every zero still a zero
    assert report["onnx_encoder_linear_sparsity"] >= 0.5 - 1e-6
    nodes = onnx.load(str(tmp_path / "export" / "deployment" / "model.onnx")).graph.node
    integer = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    assert sum("/module/" in n for n in integer) >= 12  # the six linears of each of the two layers
    assert sum("_matmul/" in n for n in integer) == (4 if attention else 0)  # both attention matmuls of each
    assert sum(n.op_type == "MatMul" for n in nodes) == (0 if attention else 4)
    from sparsebert.deploy import profile

    graph = profile.Graph.read(tmp_path / "export" / "deployment" / "model.onnx", patterns)
    scoped = [n.name for n in nodes if "_matmul/" in n.name]  # operands' quantization, matmul, rescale
    assert len(scoped) > (4 if attention else 0) and all(graph.category[n] == "attention_matmuls" for n in scoped)
    if not attention:  # a recipe naming what no module is: one clear error, not SparseML's traceback
        recipe = tmp_path / "int8" / "recipe.yaml"
        recipe.write_text(recipe.read_text().replace("QATMatMul", "QATMatMul, NoSuchModule"))
        with pytest.raises(InferenceError, match="its recipe.yaml does not fit the model"):
            load_classifier(tmp_path / "int8")
