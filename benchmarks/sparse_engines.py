"""Is there a licence-clean engine that turns unstructured sparsity into speed on this CPU?

DeepSparse's licence allows evaluation only, so this measures what else can run the pruned
encoder linears faster than dense, side by side in one run, at 1 thread and at all cores:

- PyTorch dense ``linear`` (MKL/oneDNN GEMM): the reference;
- PyTorch CSR (``Tensor.to_sparse_csr`` and ``torch.sparse.mm``): the sparse kernels torch ships;
- ONNX Runtime is not a candidate: it densifies sparse initializers when it loads a model;
- OpenVINO's sparse weight decompression (INT8 MatMuls) runs only on CPUs with AMX, by its
  docs; Apache TVM's block-sparse dense needs a TVM build. Each is reported as found or not
  (with the CPU's AMX flag), not installed by this script.

    python benchmarks/sparse_engines.py runs/mrpc/student [--seconds 2] [--json out.json]

Every pruned matrix of the checkpoint (36 for the default model) is multiplied by one batch of
``--tokens`` token vectors (batch 1 at sequence 128 is 128 rows), the work of one forward pass
through the encoder's linears; the figure is the time of all of them, and the ratio is dense
time over sparse time (above 1: the sparse kernel is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from sparsebert import hardware, offline, sparseml_mends

offline.configure()
sparseml_mends.apply()


def time_call(call, seconds: float) -> float:
    """Median seconds per call over about ``seconds``."""
    import statistics

    call()
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(weights: list, tokens: int, threads: int, seconds: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    inputs = [torch.randn(tokens, w.shape[1]) for w in weights]
    csr = [w.to_sparse_csr() for w in weights]
    with torch.inference_mode():  # the same products, or the timing means nothing
        for w, c, x in zip(weights, csr, inputs):
            assert torch.allclose(torch.sparse.mm(c, x.t()).t(), torch.nn.functional.linear(x, w), atol=1e-4)

    def dense():
        with torch.inference_mode():
            for w, x in zip(weights, inputs):
                torch.nn.functional.linear(x, w)

    def sparse_csr():  # the same layout in and out as linear: x (tokens, in) -> (tokens, out)
        with torch.inference_mode():
            for w, x in zip(csr, inputs):
                torch.sparse.mm(w, x.t()).t().contiguous()

    # Interleaved in rounds, so drift of the machine hits both alike.
    timings = {"dense": [], "csr": []}
    for _ in range(3):
        timings["dense"].append(time_call(dense, seconds / 3))
        timings["csr"].append(time_call(sparse_csr, seconds / 3))
    dense_ms, csr_ms = (1000 * min(timings[k]) for k in ("dense", "csr"))
    return {"threads": threads, "torch_dense_ms": dense_ms, "torch_csr_ms": csr_ms,
            "csr_speedup_over_dense": dense_ms / csr_ms}


def other_engines() -> dict:
    flags = hardware.cpu_flags()
    return {
        "openvino": {"installed": importlib.util.find_spec("openvino") is not None,
                     "cpu_has_amx": bool({"amx_int8", "amx_bf16"} & flags),
                     "note": "sparse weight decompression runs INT8 MatMuls on AMX CPUs only (OpenVINO docs)"},
        "tvm": {"installed": importlib.util.find_spec("tvm") is not None,
                "note": "block-sparse dense (sparse_dense) needs a TVM build and a tuned schedule"},
        "onnxruntime": {"note": "densifies sparse initializers at load: the dense baseline, not a candidate"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a pruned student folder (written by `sparsebert train`)")
    parser.add_argument("--tokens", type=int, default=128, help="rows per matrix product (batch x sequence)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from sparsebert.checkpoint import is_pruned, load_weights, pruned_patterns

    patterns = pruned_patterns(args.checkpoint)
    weights = [torch.from_numpy(w).float() for n, w in load_weights(args.checkpoint).items() if is_pruned(n, patterns)]
    if not weights:
        raise SystemExit(f"{args.checkpoint}: no pruned matrix found")
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    machine = hardware.describe()
    report = {"checkpoint": str(args.checkpoint), "matrices": len(weights), "sparsity": sparsity,
              "tokens": args.tokens, "machine": machine,
              "runs": [measure(weights, args.tokens, t, args.seconds)
                       for t in dict.fromkeys([1, hardware.physical_cores()])],
              "other_engines": other_engines()}
    print(f"{machine['cpu']} ({machine['cpus']} CPUs; {', '.join(machine['cpu_features'])}); "
          f"{len(weights)} matrices at {sparsity:.1%} sparsity, {args.tokens} rows each")
    for run in report["runs"]:
        print(f"  {run['threads']} thread(s): torch dense {run['torch_dense_ms']:.2f} ms, torch CSR "
              f"{run['torch_csr_ms']:.2f} ms -> CSR is {run['csr_speedup_over_dense']:.2f}x dense")
    for name, info in report["other_engines"].items():
        print(f"  {name}: {info}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
