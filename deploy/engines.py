"""The three ways to run a deployment: PyTorch (the checkpoint), ONNX Runtime and DeepSparse
(the ONNX file). Each takes the same fixed-shape int64 inputs and returns raw logits, so
parity and latency compare like with like."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

ENGINES = ("pytorch", "onnxruntime", "deepsparse")


def private_copy(onnx_path: Path) -> Path:
    """A copy of ``model.onnx`` in a temporary folder: DeepSparse (and its ONNX Runtime
    wrapper) rewrite the file they load in place with a fixed batch size."""
    folder = Path(tempfile.mkdtemp(prefix="sparsebert-onnx-"))
    copy = folder / "model.onnx"
    shutil.copyfile(onnx_path, copy)
    return copy


class Runner:
    """Runs batches of exactly ``batch_size`` rows of length ``sequence_length``.

    ``threads`` caps the engine's threads (torch intra-op threads, ONNX Runtime intra-op threads,
    DeepSparse cores); None keeps each library's default (all cores).
    """

    def __init__(self, engine: str, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 threads: int | None = None):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self.engine, self.batch_size, self.sequence_length = engine, batch_size, sequence_length
        if engine == "pytorch":
            import torch
            from transformers import AutoModelForSequenceClassification

            self._torch = torch
            if threads:
                torch.set_num_threads(threads)
            self._model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        elif engine == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = onnxruntime.InferenceSession(str(deployment / "model.onnx"), options,
                                                         providers=["CPUExecutionProvider"])
            self._input_names = [i.name for i in self._session.get_inputs()]
        else:
            from deepsparse import Engine

            self._copy = private_copy(deployment / "model.onnx")
            cores = {"num_cores": threads} if threads else {}  # default: all cores
            self._engine = Engine(model=str(self._copy), batch_size=batch_size,
                                  input_shapes=[[batch_size, sequence_length]] * 3, **cores)
            self._input_names = list(self._engine.input_names)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.engine == "pytorch":
            with self._torch.inference_mode():
                return self._model(**{k: self._torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
        if self.engine == "onnxruntime":
            return self._session.run(None, {n: inputs[n] for n in self._input_names})[0]
        return self._engine([inputs[n] for n in self._input_names])[0]

    def close(self) -> None:
        if self.engine == "deepsparse":
            del self._engine
            shutil.rmtree(self._copy.parent, ignore_errors=True)


def encode(tokenizer, examples: list[dict], sequence_length: int) -> dict[str, np.ndarray]:
    """Fixed-length int64 inputs for GLUE examples (one sentence or a pair)."""
    first = [e["sentence1"] for e in examples]
    second = [e["sentence2"] for e in examples] if "sentence2" in examples[0] else None
    encoded = tokenizer(first, second, padding="max_length", truncation=True,
                        max_length=sequence_length, return_tensors="np")
    names = ("input_ids", "attention_mask", "token_type_ids")
    return {k: encoded[k].astype(np.int64) for k in names}


def run_batched(runner: Runner, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Logits for all rows, padding the last batch to the runner's fixed batch size."""
    rows = len(inputs["input_ids"])
    outputs = []
    for start in range(0, rows, runner.batch_size):
        batch = {k: v[start:start + runner.batch_size] for k, v in inputs.items()}
        short = runner.batch_size - len(batch["input_ids"])
        if short:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in batch.items()}
        outputs.append(runner(batch)[: runner.batch_size - short])
    return np.concatenate(outputs)
