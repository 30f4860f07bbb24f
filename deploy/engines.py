"""The ways to run a deployment: PyTorch (the checkpoint), ONNX Runtime and DeepSparse (the ONNX
file), and PyTorch with the pruned linears as CSR matrices (``pytorch-csr``: the licence-clean
sparse engine; DeepSparse's licence is for evaluation only). Each takes the same fixed-shape
int64 inputs, named as the ONNX graph names them (``input_names``), and returns raw logits, so
parity and latency compare like with like."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from sparsebert.inference import onnx_input_names

ENGINES = ("pytorch", "onnxruntime", "deepsparse", "pytorch-csr")
# A linear at least this sparse runs as a CSR matrix on the pytorch-csr engine.
CSR_MIN_SPARSITY = 0.5


def with_csr_linears(model):
    """``model`` with every linear of at least CSR_MIN_SPARSITY zeros computing ``y = x W^T + b``
    from ``W`` stored as CSR (in place): torch's sparse kernels skip the zeros, which its dense
    GEMM (and ONNX Runtime, which densifies sparse initializers at load) multiply."""
    import torch

    class CSRLinear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.weight = linear.weight.detach().to_sparse_csr()
            self.bias = None if linear.bias is None else linear.bias.detach()

        def forward(self, x):
            out = torch.sparse.mm(self.weight, x.reshape(-1, x.shape[-1]).t()).t()
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])

    import warnings

    with warnings.catch_warnings():  # torch calls its CSR support beta at every conversion
        warnings.simplefilter("ignore", UserWarning)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and float((child.weight == 0).float().mean()) >= CSR_MIN_SPARSITY:
                    setattr(module, name, CSRLinear(child))
    return model


def private_copy(onnx_path: Path) -> Path:
    """A copy of ``model.onnx`` in a temporary folder: DeepSparse (and its ONNX Runtime
    wrapper) rewrite the file they load in place with a fixed batch size."""
    folder = Path(tempfile.mkdtemp(prefix="sparsebert-onnx-"))
    copy = folder / "model.onnx"
    shutil.copyfile(onnx_path, copy)
    return copy


def exported_length(onnx_path: Path) -> int | None:
    """The fixed sequence length of the graph's first input (None when it is dynamic)."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) > 1 and dims[1].dim_value else None


class Runner:
    """Runs batches of exactly ``batch_size`` rows of length ``sequence_length``.

    ``input_names`` are the ONNX graph's inputs (the PyTorch model takes the same names).
    ``threads`` caps the engine's threads (torch intra-op threads, ONNX Runtime intra-op threads,
    DeepSparse cores); None keeps each library's default (all cores).
    """

    def __init__(self, engine: str, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 threads: int | None = None):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self.engine, self.batch_size, self.sequence_length = engine, batch_size, sequence_length
        self.input_names = onnx_input_names(deployment / "model.onnx")
        if engine in ("pytorch", "pytorch-csr"):
            import torch

            from sparsebert.hardware import physical_cores
            from sparsebert.inference import is_quantized, load_classifier

            self._torch = torch
            # torch's thread count is process-wide: set it every time, or an earlier runner's stays.
            torch.set_num_threads(threads or physical_cores())
            self._model = load_classifier(model_dir)
            if engine == "pytorch-csr":
                if is_quantized(model_dir):
                    raise ValueError(f"{model_dir} is an INT8 (QAT) checkpoint; pytorch-csr runs FP32 ones")
                with_csr_linears(self._model)
        elif engine == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            path = deployment / "model.onnx"
            if exported_length(path) != sequence_length:
                # The graph's sequence length is fixed at export; run another length (a bucket)
                # on a copy with its inputs reshaped, as DeepSparse does on its own copy.
                from deepsparse.utils.onnx import override_onnx_input_shapes

                self._copy = path = private_copy(path)
                shapes = [[batch_size, sequence_length]] * len(self.input_names)
                with override_onnx_input_shapes(str(path), shapes, inplace=True):  # rewrites the copy
                    pass
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            from deepsparse import Engine

            self._copy = private_copy(deployment / "model.onnx")
            cores = {"num_cores": threads} if threads else {}  # default: all cores
            shapes = [[batch_size, sequence_length]] * len(self.input_names)
            self._engine = Engine(model=str(self._copy), batch_size=batch_size, input_shapes=shapes, **cores)
            if list(self._engine.input_names) != self.input_names:
                raise ValueError(f"DeepSparse reads inputs {self._engine.input_names}, the ONNX file {self.input_names}")

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.engine in ("pytorch", "pytorch-csr"):
            with self._torch.inference_mode():
                tensors = {n: self._torch.from_numpy(inputs[n]) for n in self.input_names}
                return self._model(**tensors).logits.float().numpy()
        if self.engine == "onnxruntime":
            return self._session.run(None, {n: inputs[n] for n in self.input_names})[0]
        return self._engine([inputs[n] for n in self.input_names])[0]

    def close(self) -> None:
        if self.engine == "deepsparse":
            del self._engine
        if getattr(self, "_copy", None):
            shutil.rmtree(self._copy.parent, ignore_errors=True)


def run_batched(runner: Runner, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Logits for all rows, padding the last batch to the runner's fixed batch size."""
    rows = len(next(iter(inputs.values())))
    outputs = []
    for start in range(0, rows, runner.batch_size):
        batch = {k: v[start:start + runner.batch_size] for k, v in inputs.items()}
        short = runner.batch_size - len(next(iter(batch.values())))
        if short:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in batch.items()}
        outputs.append(runner(batch)[: runner.batch_size - short])
    return np.concatenate(outputs)
