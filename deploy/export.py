"""Export stage: a checkpoint to a ``deployment/`` folder (``model.onnx`` with the zeros kept,
``config.json`` with real label names, the tokenizer) through SparseML's exporter, then check
the result against the checkpoint it came from."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import numpy as np

from sparsebert.errors import UserError
from sparsebert.pipeline.report import is_pruned, load_weights, pruned_patterns

SAMPLE_TEXTS = [
    ("The movie was a delight from start to finish.", "It was a pleasure to watch."),
    ("A dull, lifeless script.", "The plot is thin and the actors look bored."),
    ("Stocks fell sharply on Monday.", "Markets rose to a record high."),
    ("He said the meeting would be postponed until next week because of the storm.", "The meeting was moved."),
]


class ExportError(UserError):
    pass


@contextlib.contextmanager
def torchscript_onnx_exporter():
    """torch >= 2.9 defaults ``torch.onnx.export`` to the dynamo exporter, which needs
    onnxscript and onnx >= 1.16 (SparseML 1.8 pins onnx < 1.15); SparseML calls it without a
    ``dynamo`` argument, so select the TorchScript exporter for the duration of the export."""
    import torch

    original = torch.onnx.export
    torch.onnx.export = functools.partial(original, dynamo=False)
    try:
        yield
    finally:
        torch.onnx.export = original


def export(model_dir: Path, target: Path, sequence_length: int = 128) -> Path:
    """Write ``target/deployment/`` for the checkpoint in ``model_dir``; return that folder."""
    from sparseml import export as sparseml_export

    if not (Path(model_dir) / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a model folder (no config.json)")
    with torchscript_onnx_exporter():
        sparseml_export(source_path=str(model_dir), target_path=str(target), task="text-classification",
                        integration="transformers", sequence_length=sequence_length)
    deployment = Path(target) / "deployment"
    (Path(target) / "model.onnx").unlink(missing_ok=True)  # a copy of deployment/model.onnx
    return deployment


def pruned_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The checkpoint's matrices that its recipe prunes; refuses a checkpoint where none match."""
    patterns = pruned_patterns(model_dir)
    pruned = {n: w for n, w in load_weights(model_dir).items() if is_pruned(n, patterns)}
    if not pruned:
        raise ExportError(f"{model_dir}: the recipe's pruned params {patterns} match no weight")
    return pruned


def onnx_sparsity(model_dir: Path, onnx_path: Path, pruned: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Zero fraction of every pruned weight, read back from the ONNX initializers.

    The TorchScript exporter folds each Linear weight into a transposed initializer with a
    generated name, so weights are matched by their values, not their names.
    """
    import onnx
    from onnx import numpy_helper

    initializers = [numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer]
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for array in initializers:
        if array.ndim == 2:
            by_shape.setdefault(array.shape, []).append(array)
    found = {}
    for name, weight in (pruned if pruned is not None else pruned_weights(model_dir)).items():
        match = next((a for a in by_shape.get(weight.T.shape, []) if np.array_equal(a, weight.T)), None)
        if match is None:
            match = next((a for a in by_shape.get(weight.shape, []) if np.array_equal(a, weight)), None)
        if match is None:
            raise ExportError(f"{name} was not found unchanged in {onnx_path}")
        found[name] = float((match == 0).mean())
    return found


def sample_inputs(tokenizer, pairs: bool, sequence_length: int) -> dict[str, np.ndarray]:
    first = [a for a, _ in SAMPLE_TEXTS]
    second = [b for _, b in SAMPLE_TEXTS] if pairs else None
    encoded = tokenizer(first, second, padding="max_length", truncation=True,
                        max_length=sequence_length, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in encoded.items()}


def logits_difference(model_dir: Path, deployment: Path, sequence_length: int = 128) -> float:
    """Largest |ONNX Runtime - PyTorch| logit on sample sentences and sentence pairs."""
    import onnxruntime
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deployment)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    session = onnxruntime.InferenceSession(str(deployment / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    worst = 0.0
    for pairs in (False, True):
        inputs = sample_inputs(tokenizer, pairs, sequence_length)
        onnx_logits = session.run(None, {k: v for k, v in inputs.items() if k in names})[0]
        with torch.inference_mode():
            torch_logits = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    return worst


def export_and_check(model_dir: Path, target: Path, sequence_length: int = 128,
                     max_logit_difference: float = 1e-3) -> dict:
    """Export, then verify sparsity survived and outputs match; write ``export.json``."""
    deployment = export(model_dir, target, sequence_length)
    config = json.loads((deployment / "config.json").read_text())
    if not config.get("id2label") or all(str(k) == str(v) for k, v in config["id2label"].items()):
        raise ExportError(f"{deployment}/config.json has no real label names: {config.get('id2label')}")
    pruned = pruned_weights(model_dir)
    sizes = {n: w.size for n, w in pruned.items()}
    torch_sparsity = {n: float((w == 0).mean()) for n, w in pruned.items()}
    exported = onnx_sparsity(model_dir, deployment / "model.onnx", pruned)
    zeros = sum(exported[n] * sizes[n] for n in exported)
    difference = logits_difference(model_dir, deployment, sequence_length)
    report = {
        "source": str(model_dir),
        "deployment": str(deployment),
        "sequence_length": sequence_length,
        "labels": config["id2label"],
        "onnx_sparsity": exported,
        "onnx_encoder_linear_sparsity": zeros / sum(sizes.values()) if sizes else 0.0,
        "sparsity_matches_checkpoint": all(abs(exported[n] - torch_sparsity[n]) < 1e-9 for n in exported),
        "max_logit_difference": difference,
        "max_logit_difference_allowed": max_logit_difference,
    }
    (Path(target) / "export.json").write_text(json.dumps(report, indent=2))
    if not report["sparsity_matches_checkpoint"]:
        raise ExportError(f"{deployment}: ONNX weights lost sparsity against {model_dir}")
    if difference > max_logit_difference:
        raise ExportError(f"{deployment}: ONNX logits differ from PyTorch by {difference:.2e} "
                          f"(allowed {max_logit_difference:.0e})")
    return report
