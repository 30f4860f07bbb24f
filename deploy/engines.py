"""The three ways to run a deployment: PyTorch (the checkpoint), ONNX Runtime and DeepSparse
(the ONNX file). Each takes the same fixed-shape int64 inputs, named as the ONNX graph names
them (``input_names``), and returns raw logits, so parity and latency compare like with like."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from sparsebert.inference import onnx_input_names

ENGINES = ("pytorch", "onnxruntime", "deepsparse")


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
        if engine == "pytorch":
            import torch
            from sparsebert.inference import load_classifier

            self._torch = torch
            if threads:
                torch.set_num_threads(threads)
            self._model = load_classifier(model_dir)
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
        if self.engine == "pytorch":
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
