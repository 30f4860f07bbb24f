"""`sparsebert profile`: every node of the exported graph in one category, the encoder linears
being the pruned matrices' MatMuls, and each engine's kernels traced to those nodes and summed
to its pass, none dropped (the INT8 graph: tests/test_int8.py)."""

import json

import onnx
import pytest

from sparsebert.checkpoint import is_pruned, pruned_patterns
from sparsebert.cli import main
from sparsebert.deploy import profile


def _graph(exported_run, which="student"):
    path = exported_run / "export" / which / "deployment" / "model.onnx"
    return onnx.load(str(path)).graph, profile.Graph.read(path, pruned_patterns(exported_run / which))


def test_every_node_has_a_category_and_the_linears_are_the_pruned_matmuls(exported_run):
    nodes, graph = _graph(exported_run)
    assert set(graph.category) == {n.name for n in nodes.node}  # nothing left out
    assert set(graph.category.values()) <= set(profile.CATEGORIES)
    initializers = {t.name for t in nodes.initializer}
    patterns = pruned_patterns(exported_run / "student")
    weighted = [n for n in nodes.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & initializers]
    linears = [n for n in weighted if is_pruned(f"{profile.module_of(n.name)}.weight", patterns)]
    assert len(linears) == 36  # six per layer
    assert all(graph.category[n.name] == "encoder_linears" for n in linears)
    assert {graph.category[n.name] for n in weighted if n not in linears} == {"rest"}  # pooler and classifier
    count = lambda category, op: sum(graph.category[n.name] == category and n.op_type == op for n in nodes.node)  # noqa: E731
    assert count("attention_matmuls", "MatMul") == 12 and count("softmax", "Softmax") == 6
    assert all(graph.category[n.name] == "layernorm_gelu" for n in nodes.node if "/LayerNorm/" in n.name)
    assert all(graph.category[n.name] == "embeddings" for n in nodes.node
               if n.name.startswith("/bert/embeddings/") and "/LayerNorm/" not in n.name)


def test_profile_splits_each_engines_pass_and_drops_no_kernel(exported_run):
    assert main(["profile", str(exported_run), "--passes", "3"]) == 0
    report = json.loads((exported_run / "bench" / "profile.json").read_text())
    assert {(r["model"], r["engine"]) for r in report["rows"]} == {
        (m, e) for m in ("dense", "sparse 90%") for e in ("onnxruntime", "deepsparse")}
    _, graph = _graph(exported_run)
    for r in report["rows"]:
        assert sum(r["ms"].values()) == pytest.approx(r["total_ms"], rel=1e-9)
        assert sum(r["share"].values()) == pytest.approx(1.0)
        kernels = sum(k["ms"] for k in r["kernels"])
        assert kernels + r["outside_kernels_ms"] == pytest.approx(r["total_ms"], rel=1e-9)  # every kernel counted
        for category in profile.CATEGORIES:  # each category is its kernels' sum (the pass's bookkeeping: rest)
            own = sum(k["ms"] for k in r["kernels"] if k["category"] == category)
            assert r["ms"][category] == pytest.approx(own + (r["outside_kernels_ms"] if category == "rest" else 0))
        assert all(n in graph.category for k in r["kernels"] for n in k["nodes"])
        assert r["share"]["encoder_linears"] > 0.3 and r["plain_pass_ms"] > 0  # MiniLM at 128 tokens: linears lead
    ort = next(r for r in report["rows"] if (r["model"], r["engine"]) == ("dense", "onnxruntime"))
    timed = {n for k in ort["kernels"] for n in k["nodes"]}
    linears = {n for n, c in graph.category.items() if c == "encoder_linears" and n.endswith("/MatMul")}
    assert len(linears) == 36 and linears <= timed  # ONNX Runtime keeps every linear's MatMul, each timed
    (sparse_ds,) = [c for c in report["comparisons"] if (c["model"], c["engine"]) == ("sparse 90%", "deepsparse")]
    assert sparse_ds["sparsity"] == pytest.approx(0.9, abs=0.005) and sparse_ds["flop_bound"] > 1
    assert 1 < sparse_ds["time_bound"] < 1 / (1 - 0.9) + 1e-9
    text = (exported_run / "bench" / "profile.md").read_text()
    assert "| encoder linears |" in text and "of the bound" in text and report["machine"]["deepsparse_isa"] in text
    assert (exported_run / "bench" / "profile.png").stat().st_size > 10_000


def test_a_fused_deepsparse_layer_counts_in_its_costliest_category(exported_run, monkeypatch):
    """A layer that fuses a linear with the LayerNorm after it is the linear's; one that names no
    tensor (a shuffle, a naive subgraph) is the rest; one naming a tensor the graph lacks stops."""
    import deepsparse.engine

    _, graph = _graph(exported_run)
    scope = "/bert/encoder/layer.0/output"
    layers = [{"name": "pyramid_1", "average_run_time_in_ms": 2.0, "sub_layer_info": [],
               "canonical_name": f"{scope}/dense/MatMul_output_0,{scope}/LayerNorm/Add_1_output_0"},
              {"name": "sub_pyramid", "sub_layer_info": [
                  {"name": "shuffle_2", "canonical_name": "<none>", "average_run_time_in_ms": 0.5},
                  {"name": "softmax_3", "average_run_time_in_ms": 0.25,
                   "canonical_name": "/bert/encoder/layer.0/attention/self/Softmax_output_0_pre_q"}]},
              {"name": "Naive Subgraph 0", "canonical_name": "<none>", "average_run_time_in_ms": 1.0}]
    monkeypatch.setattr(deepsparse.engine, "model_debug_analysis", lambda *a, **k: {"layer_info": layers})
    path = exported_run / "export" / "student" / "deployment" / "model.onnx"
    kernels, total = profile.deepsparse_kernels(path, graph, [], 1, 1, passes=1)
    assert [(k.name, k.category) for k in kernels] == [("pyramid_1", "encoder_linears"), ("shuffle_2", "rest"),
                                                      ("softmax_3", "softmax"), ("Naive Subgraph 0", "rest")]
    assert kernels[0].nodes == [f"{scope}/dense/MatMul", f"{scope}/LayerNorm/Add_1"] and total == 3.75
    layers.append({"name": "gemm_4", "canonical_name": "not_in_the_graph", "average_run_time_in_ms": 1.0})
    with pytest.raises(profile.ProfileError, match="gemm_4"):
        profile.deepsparse_kernels(path, graph, [], 1, 1, passes=1)


def test_compare_sets_each_sparse_pass_against_the_dense_ones():
    def row(model, engine, ms, linear_share):
        return {"model": model, "engine": engine, "total_ms": ms, "share": {"encoder_linears": linear_share}}

    rows = [row("dense", "onnxruntime", 30.0, 0.8), row("dense", "deepsparse", 40.0, 0.9),
            row("sparse 95%", "deepsparse", 10.0, 0.5)]
    (c,) = profile.compare(rows, {"sparse 95%": {"sparsity": 0.95, "flop_bound": 9.0}})
    assert c["vs_dense_same_engine"] == pytest.approx(4.0) and c["vs_dense_onnxruntime"] == pytest.approx(3.0)
    assert c["time_bound"] == pytest.approx(1 / (0.1 + 0.9 * 0.05))  # the dense DeepSparse pass's 90%
    assert c["flop_bound"] == 9.0


def test_profile_refuses_bad_flags_before_reading_the_run(tmp_path, capsys):
    assert main(["profile", str(tmp_path), "--bert-base", "1.5"]) == 2
    assert "sparsities must be in (0, 1)" in capsys.readouterr().err
    assert main(["profile", str(tmp_path), "--passes", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
