"""The pruned linears alone: how much faster than a dense GEMM each licence-clean sparse kernel
multiplies them, one matrix shape at a time, side by side in one run, at 1 thread and all cores.

- ONNX Runtime's dense MatMul (MLAS): what the dense baseline runs; all matrices of a shape in
  one session, so its call overhead is paid once, as in the whole graph;
- PyTorch's dense ``linear`` (MKL/oneDNN);
- PyTorch CSR (``torch.sparse.mm``): the ``pytorch-csr`` engine's kernel;
- the Numba CSR kernel (``deploy/sparse_kernels.py``): the ``onnxruntime-sparse`` engine's, on
  feature-major activations as that engine hands them over (its transposes are in the engine's
  figures, not here), its rows split over the row's ``threads`` where the product is large
  enough, as the engine runs it.

    python benchmarks/sparse_engines.py [runs/mrpc/student] [--sparsity 0.95] [--tokens 128 2048] \\
        [--seconds 2] [--json out.json]

Without a checkpoint, the default model's encoder linears are pruned by magnitude to
``--sparsity`` (where the zeros sit, not the weights' values, decides the speed). Each figure is
the time to multiply every matrix of that shape once by ``--tokens`` token vectors (batch 1 at
128 tokens is 128), the best of three interleaved rounds; ratios are dense over sparse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sparsebert import hardware, offline, sparseml_mends

offline.configure()
sparseml_mends.apply()


def time_call(call, seconds: float) -> float:
    """Median seconds per call over about ``seconds``."""
    call()
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pruned_weights(checkpoint: Path | None, sparsity: float) -> dict:
    """{name: (out x in) float32 array} of the pruned matrices: the checkpoint's, or the default
    model's cut to ``sparsity`` by magnitude, each matrix on its own (as GMP cuts them)."""
    import numpy as np

    from sparsebert.checkpoint import is_pruned, load_weights, pruned_patterns

    if checkpoint is None:
        from transformers import AutoModel

        from sparsebert.deploy.bench import prune_by_magnitude
        from sparsebert.models import embedded_default

        model = AutoModel.from_pretrained(embedded_default())
        prune_by_magnitude(model, sparsity)
        saved, patterns = {n: p.detach().numpy() for n, p in model.named_parameters()}, pruned_patterns()
    else:
        saved, patterns = load_weights(checkpoint), pruned_patterns(checkpoint)
    return {name: np.asarray(array, dtype=np.float32) for name, array in saved.items()
            if is_pruned(name, patterns) and array.ndim == 2}


def onnxruntime_dense(group: list, threads: int):
    """One session multiplying one input by every matrix of the group (y = x W^T, as exported)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    out_dim, in_dim = group[0].shape
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(group))]
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", in_dim])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["t", out_dim])
                               for i in range(len(group))],
                              [numpy_helper.from_array(w.T.copy(), f"w{i}") for i, w in enumerate(group)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                        .SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(group: list, tokens: int, threads: int, seconds: float) -> dict:
    import numpy as np
    import torch

    from sparsebert.deploy.sparse_kernels import CSRMatrix

    torch.set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal((tokens, group[0].shape[1])).astype(np.float32)
    x_t, x_torch = np.ascontiguousarray(x.T), torch.from_numpy(x)
    dense_torch = [torch.from_numpy(w) for w in group]
    csr_torch = [w.to_sparse_csr() for w in dense_torch]
    csr_numba = [CSRMatrix.from_dense(w) for w in group]
    session = onnxruntime_dense(group, threads)
    expected = [x @ w.T for w in group]
    # The same products, or the timing means nothing.
    for want, got in zip(expected, session.run(None, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for want, w in zip(expected, csr_numba):
        np.testing.assert_allclose(w.matmul_t(x_t).T, want, rtol=1e-4, atol=1e-4)

    def torch_dense():
        with torch.inference_mode():
            for w in dense_torch:
                torch.nn.functional.linear(x_torch, w)

    def torch_csr():
        with torch.inference_mode():
            for w in csr_torch:
                torch.sparse.mm(w, x_torch.t()).t().contiguous()

    calls = {"onnxruntime_dense": lambda: session.run(None, {"x": x}), "torch_dense": torch_dense,
             "torch_csr": torch_csr, "numba_csr": lambda: [w.matmul_t(x_t, threads) for w in csr_numba]}
    timings = {name: [] for name in calls}
    for _ in range(3):  # interleaved rounds: drift of the machine hits every kernel alike
        for name, call in calls.items():
            timings[name].append(time_call(call, seconds / 3 / len(calls)))
    ms = {f"{name}_ms": 1000 * min(values) for name, values in timings.items()}
    return {"threads": threads, "tokens": tokens, **ms,
            "numba_vs_onnxruntime_dense": ms["onnxruntime_dense_ms"] / ms["numba_csr_ms"],
            "numba_vs_torch_dense": ms["torch_dense_ms"] / ms["numba_csr_ms"],
            "torch_csr_vs_torch_dense": ms["torch_dense_ms"] / ms["torch_csr_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a pruned student folder (default: the "
                                                                 "default model pruned by magnitude)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="without a checkpoint: the zeros per matrix")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 2048],
                        help="rows per product (batch x sequence: 128 is batch 1, 2048 batch 16)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    weights = pruned_weights(args.checkpoint, args.sparsity)
    if not weights:
        raise SystemExit(f"{args.checkpoint}: no pruned matrix found")
    groups = {}
    for array in weights.values():
        groups.setdefault(array.shape, []).append(array)
    sparsity = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    machine = hardware.describe()
    print(f"{machine['cpu']} ({machine['cpus']} CPUs; {', '.join(machine['cpu_features']) or 'no AVX512'}); "
          f"{len(weights)} matrices at {sparsity:.1%} sparsity ({args.checkpoint or 'default model, by magnitude'})")
    print("| out x in | matrices | tokens | threads | ORT dense ms | torch dense ms | torch CSR ms | Numba CSR ms "
          "| Numba / ORT dense | Numba / torch dense | torch CSR / torch dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for threads in dict.fromkeys([1, hardware.physical_cores()]):
        for tokens in args.tokens:
            for shape, group in groups.items():
                row = {"shape": list(shape), "matrices": len(group), **measure(group, tokens, threads, args.seconds)}
                rows.append(row)
                print(f"| {shape[0]} x {shape[1]} | {len(group)} | {tokens} | {threads} | {row['onnxruntime_dense_ms']:.2f} "
                      f"| {row['torch_dense_ms']:.2f} | {row['torch_csr_ms']:.2f} | {row['numba_csr_ms']:.2f} "
                      f"| {row['numba_vs_onnxruntime_dense']:.2f}x | {row['numba_vs_torch_dense']:.2f}x "
                      f"| {row['torch_csr_vs_torch_dense']:.2f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint) if args.checkpoint else None,
                                         "sparsity": sparsity, "machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
