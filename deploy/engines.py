"""The ways to run a deployment, in one table (``TABLE``): PyTorch (the checkpoint), ONNX Runtime
and DeepSparse (the ONNX file), ONNX Runtime with the pruned MatMuls on a CSR kernel
(``onnxruntime-sparse``: the licence-clean sparse engine; DeepSparse's licence is for evaluation
only), and PyTorch with the pruned linears as CSR matrices (``pytorch-csr``).
Each takes the same fixed-shape int64 inputs, named as the ONNX graph names them
(``input_names``), and returns raw logits, so parity and latency compare like with like.

The table says what each engine runs and how to build it; the CLI's choices, the benchmark (its
engines, columns and ratios), parity (engines and served), the server and the gates read it, so
an engine is added here and nowhere else."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from sparsebert.checkpoint import is_quantized
from sparsebert.inference import onnx_input_names

# Engine.int8: how an engine runs an INT8 model.
NATIVE = "native"  # the INT8 graph on integer kernels
EMULATED = "emulated"  # the INT8 (QAT) checkpoint with fake quantization: a reference, never timed
# The dense baseline: what a fixed-shape server runs without this project.
BASELINE = "onnxruntime"
# A linear (MatMul weight) at least this sparse runs on the sparse engines' CSR kernels
# (pytorch-csr, onnxruntime-sparse).
CSR_MIN_SPARSITY = 0.5


@dataclass(frozen=True)
class Engine:
    name: str
    doc: str  # one line, in the CLI's help
    # (model_dir, deployment, batch_size, sequence_length, input_names, threads) -> a backend:
    # backend(inputs) gives the logits of one batch, backend.close() frees it.
    load: Callable
    int8: str | None  # NATIVE, EMULATED or None (FP32 models only)
    exploits_sparsity: bool  # its kernels skip the zeros
    # On a dense model it is another engine (pytorch-csr is PyTorch), so it is not timed there.
    needs_sparse_model: bool
    # The DeepSparse pipeline's engine_type that serves it ("deepsparse", "onnxruntime"), which
    # `sparsebert serve` and deepsparse.server's config name; None: not served.
    serves_as: str | None
    label: str  # short name in the benchmark's ratio headers
    # The dense runs the benchmark divides this engine's sparse figures by (its ratio columns);
    # None: the dense baseline for an engine that exploits sparsity, nothing otherwise.
    vs_dense: tuple[str, ...] | None = None
    # For an engine_type DeepSparse's pipelines do not know: (onnx_path, cores) -> the engine
    # the pipeline calls (a list of inputs in the graph's order in, its outputs out). Only
    # `sparsebert serve` builds it; the stock deepsparse.server refuses the engine_type.
    pipeline_engine: Callable | None = None

    @property
    def ratios_over(self) -> tuple[str, ...]:
        if self.vs_dense is not None:
            return self.vs_dense
        return (BASELINE,) if self.exploits_sparsity else ()


def engine_names() -> tuple[str, ...]:
    return tuple(TABLE)


def served_engines(int8: bool = False) -> tuple[str, ...]:
    """The engines that serve (``int8``: an INT8 graph, on integer kernels)."""
    return tuple(name for name, engine in TABLE.items() if engine.serves_as and (not int8 or engine.int8 == NATIVE))


def pipeline_engine_type(name: str) -> str:
    """What deepsparse.server's config says for a served engine: its pipeline's engine_type."""
    serves_as = TABLE[name].serves_as
    if serves_as is None:
        raise ValueError(f"engine {name!r} is not served (served: {', '.join(served_engines())})")
    return serves_as


def pipeline_engine_builder(engine_type: str) -> Callable | None:
    """How to build the engine a DeepSparse pipeline of ``engine_type`` calls, where the project
    builds it (None: DeepSparse builds its own)."""
    for engine in TABLE.values():
        if engine.serves_as == engine_type:
            return engine.pipeline_engine
    return None


def engines_for(int8: bool, sparse: bool = True, timed: bool = False, among: Iterable[str] | None = None) -> list[str]:
    """The engines (of ``among``, in its order; default the table's) that run a model that is
    ``int8`` or not. ``timed`` (the benchmark): only those whose figures are their own: an INT8
    model on integer kernels (PyTorch only emulates them), and an engine that needs a sparse
    model only on a ``sparse`` one."""
    kinds = (NATIVE,) if timed else (NATIVE, EMULATED)

    def runs(engine: Engine) -> bool:
        return (not int8 or engine.int8 in kinds) and not (timed and engine.needs_sparse_model and not sparse)

    return [name for name in (engine_names() if among is None else among) if runs(TABLE[name])]


def ratio_columns() -> list[tuple[str, str, str, str]]:
    """The benchmark's ratio columns: (sparse engine, dense engine, key suffix, header), the
    engines that exploit sparsity first (the headline, sparse DeepSparse over dense ONNX Runtime,
    leads), then table order. The key is ``<prefix>_<sparse>_vs_dense_<dense>``, the sparse
    engine left out when both are the same (``sparse_vs_dense_deepsparse``)."""
    columns = []
    for engine in sorted(TABLE.values(), key=lambda e: not e.exploits_sparsity):
        for dense in engine.ratios_over:
            same = dense == engine.name
            suffix = f"vs_dense_{dense}" if same else f"{engine.name}_vs_dense_{dense}"
            header = (f"sparse / dense ({TABLE[dense].label})" if same
                      else f"sparse {engine.label} / dense {TABLE[dense].label}")
            columns.append((engine.name, dense, suffix.replace("-", "_"), header))
    return columns


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


@contextlib.contextmanager
def private_copy(onnx_path: Path):
    """A copy of ``model.onnx`` in a temporary folder, removed on leaving: DeepSparse (and its
    ONNX Runtime wrapper) rewrite the file they load in place with a fixed batch size. Both
    engines read the file once, when built, so the copy goes as soon as the engine stands:
    one kept per runner filled the disk (a benchmark builds dozens of runners)."""
    folder = Path(tempfile.mkdtemp(prefix="sparsebert-onnx-"))
    try:
        copy = folder / "model.onnx"
        shutil.copyfile(onnx_path, copy)
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def exported_length(onnx_path: Path) -> int | None:
    """The fixed sequence length of the graph's first input (None when it is dynamic)."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) > 1 and dims[1].dim_value else None


# ---------------------------------------------------------------- the engines' backends


class TorchBackend:
    """The checkpoint in PyTorch (an INT8 one with fake quantization)."""

    def __init__(self, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 input_names: list[str], threads: int | None):
        import torch

        from sparsebert.hardware import physical_cores
        from sparsebert.inference import load_classifier

        self._torch, self.input_names = torch, input_names
        # torch's thread count is process-wide: set it every time, or an earlier runner's stays.
        torch.set_num_threads(threads or physical_cores())
        self.model = load_classifier(model_dir)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with self._torch.inference_mode():
            tensors = {n: self._torch.from_numpy(inputs[n]) for n in self.input_names}
            return self.model(**tensors).logits.float().numpy()

    def close(self) -> None:
        pass


class TorchCSRBackend(TorchBackend):
    """PyTorch with the pruned linears as CSR matrices."""

    def __init__(self, *args):
        super().__init__(*args)
        with_csr_linears(self.model)


class OnnxRuntimeBackend:
    def __init__(self, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 input_names: list[str], threads: int | None):
        import onnxruntime

        self.input_names = input_names
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        path = deployment / "model.onnx"
        if exported_length(path) == sequence_length:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return
        # The graph's sequence length is fixed at export; run another length (a bucket)
        # on a copy with its inputs reshaped, as DeepSparse does on its own copy.
        from deepsparse.utils.onnx import override_onnx_input_shapes

        with private_copy(path) as copy:
            shapes = [[batch_size, sequence_length]] * len(input_names)
            with override_onnx_input_shapes(str(copy), shapes, inplace=True):  # rewrites the copy
                pass
            self._session = onnxruntime.InferenceSession(str(copy), options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, {n: inputs[n] for n in self.input_names})[0]

    def close(self) -> None:
        pass


class DeepSparseBackend:
    def __init__(self, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 input_names: list[str], threads: int | None):
        from deepsparse import Engine as DeepSparseEngine

        self.input_names = input_names
        cores = {"num_cores": threads} if threads else {}  # default: all cores
        shapes = [[batch_size, sequence_length]] * len(input_names)
        with private_copy(deployment / "model.onnx") as copy:
            self._engine = DeepSparseEngine(model=str(copy), batch_size=batch_size, input_shapes=shapes, **cores)
        if list(self._engine.input_names) != input_names:
            raise ValueError(f"DeepSparse reads inputs {self._engine.input_names}, the ONNX file {input_names}")

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._engine([inputs[n] for n in self.input_names])[0]

    def close(self) -> None:
        del self._engine


def _onnxruntime_sparse():
    """The sparse engine's module, imported when used: it compiles its kernel with Numba."""
    from sparsebert.deploy import onnxruntime_sparse

    return onnxruntime_sparse


# ---------------------------------------------------------------- the table

TABLE: dict[str, Engine] = {e.name: e for e in (
    Engine("pytorch", "the checkpoint in PyTorch (the reference)", TorchBackend, int8=EMULATED,
           exploits_sparsity=False, needs_sparse_model=False, serves_as=None, label="PyTorch"),
    Engine("onnxruntime", "the ONNX file on ONNX Runtime (the dense baseline)", OnnxRuntimeBackend, int8=NATIVE,
           exploits_sparsity=False, needs_sparse_model=False, serves_as="onnxruntime", label="ORT",
           vs_dense=("onnxruntime",)),
    Engine("deepsparse", "the ONNX file on DeepSparse (sparse kernels; licence for evaluation only)",
           DeepSparseBackend, int8=NATIVE, exploits_sparsity=True, needs_sparse_model=False, serves_as="deepsparse",
           label="DS", vs_dense=("onnxruntime", "deepsparse", "pytorch")),
    Engine("onnxruntime-sparse", "the ONNX file on ONNX Runtime, its pruned MatMuls on a Numba CSR kernel "
           "(licence-clean sparse)", lambda *args: _onnxruntime_sparse().OnnxRuntimeSparseBackend(*args), int8=None, exploits_sparsity=True,
           needs_sparse_model=True, serves_as="onnxruntime-sparse", label="ORT-sparse",
           pipeline_engine=lambda *args: _onnxruntime_sparse().PipelineEngine(*args)),
    Engine("pytorch-csr", "PyTorch with the pruned linears as CSR matrices (licence-clean sparse)", TorchCSRBackend,
           int8=None, exploits_sparsity=True, needs_sparse_model=True, serves_as=None, label="PyTorch-CSR"),
)}


class Runner:
    """Runs batches of exactly ``batch_size`` rows of length ``sequence_length`` on the table's
    ``engine``.

    ``input_names`` are the ONNX graph's inputs (the PyTorch model takes the same names).
    ``threads`` caps the engine's threads (torch intra-op threads, ONNX Runtime intra-op threads,
    DeepSparse cores); None keeps each library's default (all cores).
    """

    def __init__(self, engine: str, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 threads: int | None = None):
        spec = TABLE.get(engine)
        if spec is None:
            raise ValueError(f"unknown engine {engine!r}; choose one of {engine_names()}")
        if spec.int8 is None and is_quantized(model_dir):
            raise ValueError(f"{model_dir} is an INT8 (QAT) checkpoint; {engine} runs FP32 ones")
        self.engine, self.batch_size, self.sequence_length = engine, batch_size, sequence_length
        self.input_names = onnx_input_names(deployment / "model.onnx")
        self.backend = spec.load(model_dir, deployment, batch_size, sequence_length, self.input_names, threads)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.backend(inputs)

    def close(self) -> None:
        self.backend.close()


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
