"""Export stage: a checkpoint to a ``deployment/`` folder (``model.onnx`` with the zeros kept,
``config.json`` with real label names, the tokenizer) through SparseML's exporter, then check
the result against the checkpoint it came from."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import numpy as np

from sparsebert import atomic, glue, inference
from sparsebert.checkpoint import is_pruned, is_quantized, load_weights, pruned_patterns
from sparsebert.errors import UserError

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
    # A QAT checkpoint (--int8) loads with its quantized structure (sparseml_mends:
    # mend_task_model_loading), and SparseML turns its fake-quantized linears into INT8
    # MatMulInteger nodes, zeros kept.
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


def int8_onnx_sparsity(onnx_path: Path, pruned: dict[str, np.ndarray]) -> dict[str, float]:
    """Zero fraction of every pruned weight in an INT8 graph: the share of its quantized values
    equal to their zero point (SparseML stores symmetric INT8 weights as uint8 around 128).

    Each MatMulInteger is named after its module (``/bert/encoder/layer.0/.../key/module/...``),
    which names the checkpoint's weight. Every zero of the checkpoint must still be a zero;
    rounding may add a few more (weights within half a step of zero), which are counted.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type != "MatMulInteger" or "/module/" not in node.name or len(node.input) < 4:
            continue
        name = node.name.split("/module/")[0].strip("/").replace("/", ".") + ".weight"
        if name not in pruned or node.input[1] not in initializers:
            continue
        quantized = numpy_helper.to_array(initializers[node.input[1]])
        if node.input[3] not in initializers:
            raise ExportError(f"{onnx_path}: the weight zero point of {node.name} is not an initializer")
        zero_point = numpy_helper.to_array(initializers[node.input[3]])
        zeros = quantized == zero_point
        if zeros.shape != pruned[name].T.shape or not zeros[pruned[name].T == 0].all():
            raise ExportError(f"{name}: its zeros in the checkpoint are not all zeros in {onnx_path}")
        found[name] = float(zeros.mean())
    missing = sorted(set(pruned) - set(found))
    if missing:
        raise ExportError(f"{onnx_path}: no INT8 MatMul found for {missing[:3]} ({len(missing)} in all)")
    return found


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


def logits_difference(model_dir: Path, deployment: Path, sequence_length: int = 128) -> float:
    """Largest |ONNX Runtime - PyTorch| logit on sample sentences and sentence pairs, both fed
    the inputs the ONNX graph names."""
    import onnxruntime
    import torch

    model, tokenizer, _ = inference.load_torch(model_dir, tokenizer_dir=deployment)
    session = onnxruntime.InferenceSession(str(deployment / "model.onnx"), providers=["CPUExecutionProvider"])
    names = inference.onnx_input_names(deployment / "model.onnx")
    worst = 0.0
    for pairs in (False, True):
        examples = [{"sentence1": a, **({"sentence2": b} if pairs else {})} for a, b in SAMPLE_TEXTS]
        inputs = inference.encode(tokenizer, examples, names, sequence_length, fixed_length=True)
        onnx_logits = session.run(None, inputs)[0]
        with torch.inference_mode():
            torch_logits = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    return worst


def describe_for_serving(deployment: Path, task: glue.GlueTask | None, sequence_length: int) -> dict:
    """``serving.json``: what the server needs beyond the model (one text or a pair, the exported
    length); a regression model's output gets its name (STS-B: ``similarity``) and problem type,
    so served answers are the value on the task's scale, not a sigmoid of it."""
    from transformers import AutoConfig

    config_path = deployment / "config.json"
    regression = task.is_regression if task else inference.is_regression(AutoConfig.from_pretrained(deployment))
    if regression:
        name = inference.REGRESSION_LABELS.get(task.name if task else "", "score")
        config = json.loads(config_path.read_text())
        config.update(problem_type="regression", id2label={"0": name}, label2id={name: 0})
        atomic.write_text(config_path, json.dumps(config, indent=2) + "\n")
    serving = {"task": task.name if task else None,
               "text_inputs": len(task.text_columns) if task else None,
               "regression": regression,
               "sequence_length": sequence_length}
    atomic.write_text(deployment / "serving.json", json.dumps(serving, indent=2) + "\n")
    return serving


def export_and_check(model_dir: Path, target: Path, sequence_length: int = 128,
                     max_logit_difference: float = 1e-3, task: glue.GlueTask | None = None,
                     overwrite: bool = False) -> dict:
    """Export, then verify sparsity survived and outputs match; write ``export.json`` and the
    manifest. An INT8 (QAT) checkpoint is exported as an INT8 graph: its zeros must all survive
    quantization, and its logits are compared with PyTorch's fake-quantized ones. ``target`` is
    built beside itself and replaces an earlier export (only with ``overwrite``) once it passed its
    checks; one that fails them leaves its report as ``failed_report(target)``."""
    with atomic.building(target, overwrite) as partial:
        report = _export_and_check(model_dir, partial, sequence_length, task)
        report["max_logit_difference_allowed"] = max_logit_difference
        problem = _failed_check(report, model_dir)
        if problem:
            atomic.write_json(failed_report(target), {**report, "deployment": None, "failure": problem}, indent=2)
            raise ExportError(f"{problem}; the export was not kept (an earlier one in {target} is), its report: "
                              f"{failed_report(target)}")
        report = atomic.relocated(report, partial, target)
        atomic.write_json(Path(partial) / "export.json", report, indent=2)
        atomic.write_manifest(partial, "export")
    failed_report(target).unlink(missing_ok=True)  # about an export this one replaced
    return report


def failed_report(target: Path) -> Path:
    """Where the report of an export that failed its checks is kept (its folder is not)."""
    return Path(target).with_name(f"{Path(target).name}-failed-export.json")


def _failed_check(report: dict, model_dir: Path) -> str | None:
    if not report["sparsity_matches_checkpoint"]:
        return f"ONNX weights lost sparsity against {model_dir}"
    if report["max_logit_difference"] > report["max_logit_difference_allowed"]:
        return (f"ONNX logits differ from PyTorch by {report['max_logit_difference']:.2e} "
                f"(allowed {report['max_logit_difference_allowed']:.0e})")
    return None


def _export_and_check(model_dir: Path, target: Path, sequence_length: int, task: glue.GlueTask | None) -> dict:
    from transformers import AutoConfig

    deployment = export(model_dir, target, sequence_length)
    serving = describe_for_serving(deployment, task, sequence_length)
    labels = inference.label_names(AutoConfig.from_pretrained(deployment).id2label, f"{deployment}/config.json")
    pruned = pruned_weights(model_dir)
    sizes = {n: w.size for n, w in pruned.items()}
    torch_sparsity = {n: float((w == 0).mean()) for n, w in pruned.items()}
    quantized = is_quantized(model_dir)
    exported = (int8_onnx_sparsity if quantized else functools.partial(onnx_sparsity, model_dir))(
        deployment / "model.onnx", pruned)
    zeros = sum(exported[n] * sizes[n] for n in exported)
    difference = logits_difference(model_dir, deployment, sequence_length)
    report = {
        "source": str(model_dir),
        "deployment": str(deployment),
        "sequence_length": sequence_length,
        "precision": "int8" if quantized else "fp32",
        "serving": serving,
        "labels": labels,
        "onnx_sparsity": exported,
        "onnx_encoder_linear_sparsity": zeros / sum(sizes.values()) if sizes else 0.0,
        # INT8: the checkpoint's zeros were checked to survive; rounding may only add zeros.
        "sparsity_matches_checkpoint": all(exported[n] >= torch_sparsity[n] - 1e-9 if quantized
                                           else abs(exported[n] - torch_sparsity[n]) < 1e-9 for n in exported),
        "max_logit_difference": difference,
    }
    return report
