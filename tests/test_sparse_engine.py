"""The licence-clean sparse engine (deploy/sparse_kernels.py, deploy/onnxruntime_sparse.py): the
CSR kernel equals the dense product and keeps no zero; the graph is cut at exactly the pruned
MatMuls, wherever they sit, and the cut graph answers as the whole one; on the trained student
it runs its 36 pruned linears on the kernel within 1e-4 a logit of PyTorch. Parity and served
parity on tiny models and the student: tests/test_deploy.py, tests/test_served.py."""

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsebert.deploy.onnxruntime_sparse import SparseGraph, split
from sparsebert.deploy import sparse_kernels
from sparsebert.deploy.sparse_kernels import CSRMatrix


def sparse_matrix(rng, rows, cols, sparsity):
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    weight[rng.random((rows, cols)) < sparsity] = 0
    return weight


@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_the_kernel_equals_the_dense_product_and_stores_no_zero(tokens, monkeypatch):
    rng = np.random.default_rng(tokens)
    weight = sparse_matrix(rng, 96, 80, 0.9)
    weight[3] = 0  # a row with nothing to add
    weight[5, :9] = 1.5  # a row whose count of non-zeros is no multiple of the kernel's group
    csr = CSRMatrix.from_dense(weight)
    assert len(csr.data) == np.count_nonzero(weight) and np.all(csr.data != 0)
    assert csr.sparsity == pytest.approx(1 - np.count_nonzero(weight) / weight.size)
    x_t = rng.standard_normal((80, tokens)).astype(np.float32)
    np.testing.assert_allclose(csr.matmul_t(x_t), weight @ x_t, rtol=1e-5, atol=1e-5)
    bias = rng.standard_normal(96).astype(np.float32)
    np.testing.assert_allclose(csr.matmul_t(x_t, bias=bias), weight @ x_t + bias[:, None], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sparse_kernels, "PARALLEL_MIN_WORK", 0)  # split however small
    for threads in (2, 3):
        np.testing.assert_allclose(csr.matmul_t(x_t, threads), weight @ x_t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(80, tokens\)"):
        csr.matmul_t(x_t.T)


def test_rows_are_split_whole_and_by_their_non_zeros():
    weight = np.zeros((10, 4), dtype=np.float32)
    weight[0] = 1  # 4 non-zeros in the first row, one in each of the rest
    weight[1:, 0] = 1
    csr = CSRMatrix.from_dense(weight)
    assert csr.row_split(1) == [(0, 10)]
    assert csr.row_split(2) == [(0, 4), (4, 10)]  # 7 and 6 non-zeros, not 5 rows each
    parts = csr.row_split(4)
    assert parts[0][0] == 0 and parts[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def chain_model(rng, sparsity=0.9):
    """x -> MatMul(W1) -> MatMul(W2) -> Add(b) -> Relu -> MatMul(W3, dense) -> MatMul(W4) -> y: pruned
    MatMuls reading a graph input and another pruned MatMul's output directly, and a dense one."""
    weights = {"w1": sparse_matrix(rng, 16, 24, sparsity), "w2": sparse_matrix(rng, 24, 24, sparsity),
               "w3": rng.standard_normal((24, 20)).astype(np.float32), "w4": sparse_matrix(rng, 20, 8, min(sparsity, 0.6))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="m1"),
             helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="m2"),
             helper.make_node("Add", ["h2", "b"], ["h3"], name="add"),
             helper.make_node("Relu", ["h3"], ["h4"], name="relu"),
             helper.make_node("MatMul", ["h4", "w3"], ["h5"], name="m3"),
             helper.make_node("MatMul", ["h5", "w4"], ["y"], name="m4")]
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_graph_is_cut_at_each_pruned_matmul_and_answers_as_the_whole_graph(tmp_path):
    rng = np.random.default_rng(0)
    model = chain_model(rng)
    segments, pruned = split(model)
    assert [(op.node_name, op.stage) for op in pruned] == [("m1", 0), ("m2", 1), ("m4", 2)]  # m3 is dense
    # m2's bias Add is done by the kernel (m2's output goes nowhere else); m1 and m4 have none
    assert [(op.y, op.bias is not None) for op in pruned] == [("h1", False), ("h3", True), ("y", False)]
    assert [[n.name for n in s.nodes] for s in segments] == [[], [], ["relu", "m3"], []]
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    whole = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cut = SparseGraph(path, threads=1)
    for shape in ((1, 5), (3, 11)):  # any batch and length: the segments' inputs have no fixed shape
        x = rng.standard_normal((*shape, 16)).astype(np.float32)
        (expected,) = whole.run(None, {"x": x})
        (got,) = cut({"x": x})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_pruned_matmul_read_by_a_one_input_node_keeps_that_node(tmp_path):
    """No bias to take over (its reader is a Relu, not an Add): the Relu stays in the graph."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="m"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", 12])],
                              [numpy_helper.from_array(sparse_matrix(rng, 16, 12, 0.9), "w")])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    cut = SparseGraph(path, threads=1)
    assert [(op.y, op.bias) for op in cut.pruned] == [("h", None)]
    x = rng.standard_normal((5, 16)).astype(np.float32)
    (expected,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(cut({"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_a_forked_child_splits_products_over_its_own_threads(monkeypatch):
    """The parent's kernel threads do not exist in a forked child (a server forked after a bench,
    multiprocessing): its products must not wait on them forever."""
    import os
    import time

    monkeypatch.setattr(sparse_kernels, "PARALLEL_MIN_WORK", 0)
    rng = np.random.default_rng(3)
    weight = sparse_matrix(rng, 64, 32, 0.9)
    x_t = rng.standard_normal((32, 8)).astype(np.float32)
    csr = CSRMatrix.from_dense(weight)
    csr.matmul_t(x_t, threads=2)  # the parent's pool exists
    child = os.fork()
    if child == 0:
        os._exit(0 if np.allclose(csr.matmul_t(x_t, threads=2), weight @ x_t, atol=1e-5) else 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, 9)
    os.waitpid(child, 0)
    pytest.fail("the forked child's product never finished")


def test_a_graph_without_pruned_matmuls_is_one_onnx_runtime_session(tmp_path):
    model = chain_model(np.random.default_rng(1), sparsity=0.0)
    path = tmp_path / "dense.onnx"
    onnx.save(model, str(path))
    graph = SparseGraph(path, threads=1)
    assert graph.pruned == [] and len(graph.segments) == 1


def test_the_student_runs_its_36_pruned_linears_on_the_kernel(exported_run):
    from sparsebert.deploy.bench import random_inputs
    from sparsebert.deploy.engines import Runner

    deployment = exported_run / "export" / "student" / "deployment"
    reference = Runner("pytorch", exported_run / "student", deployment, 2, 64, threads=1)
    sparse = Runner("onnxruntime-sparse", exported_run / "student", deployment, 2, 64, threads=1)
    pruned = sparse.backend.graph.pruned
    assert len(pruned) == 36  # the six linears of each of the six layers; pooler and classifier stay dense
    assert all(op.weight.sparsity == pytest.approx(0.9, abs=0.01) for op in pruned)
    assert len(sparse.backend.graph.segments) == 6 * 4 + 1  # query/key/value share their cut
    inputs = random_inputs(reference.input_names, 2, 64)
    inputs["attention_mask"][1, 40:] = 0  # padding is masked alike
    np.testing.assert_allclose(sparse(inputs), reference(inputs), atol=1e-4)


def test_benchmarks_prune_exactly_the_recipes_matrices_by_magnitude():
    """The untrained models the benchmarks time (deploy/bench.prune_by_magnitude): each matrix the
    recipe prunes at the target on its own, the largest weights kept; nothing else touched."""
    import torch
    from tiny import tiny_bert

    from sparsebert.checkpoint import is_pruned, pruned_patterns
    from sparsebert.deploy.bench import prune_by_magnitude

    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prune_by_magnitude(model, 0.75)
    patterns, pruned = pruned_patterns(), 0
    for name, param in model.named_parameters():
        if not is_pruned(name, patterns):
            assert torch.equal(param, before[name]), name
            continue
        pruned += 1
        kept = param != 0
        assert float((~kept).float().mean()) == pytest.approx(0.75, abs=1 / param.numel())
        assert before[name].abs()[kept].min() >= before[name].abs()[~kept].max()
    assert pruned == 2 * 6  # two layers, six linears each
