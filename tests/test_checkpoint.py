"""One core checkpoint module: ``sparsebert.checkpoint`` is the only code that opens a
checkpoint's weight files, it reads a checkpoint the same whichever format it was saved in, and
the serving side (deploy/) reads checkpoints and scores answers through the core package,
never through the training pipeline."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_bert

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"sparsebert": REPO / "sparsebert", "sparsebert.deploy": REPO / "deploy",
            "sparsebert.pipeline": REPO / "pipeline"}


def _modules(package: str):
    for path in sorted(PACKAGES[package].glob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(tree: ast.Module, package: str) -> set[str]:
    """Every module a file imports, wherever the import is (function-local ones too): absolute,
    relative (resolved against ``package``), ``from x import y`` as ``x.y`` as well, and
    ``importlib.import_module("...")`` with a literal name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_deploy_never_imports_the_training_pipeline():
    offenders = {path.name: sorted(n for n in _imported(tree, "sparsebert.deploy")
                                   if n == "sparsebert.pipeline" or n.startswith("sparsebert.pipeline."))
                 for path, tree in _modules("sparsebert.deploy")}
    assert {name: found for name, found in offenders.items() if found} == {}


def _docstrings(tree: ast.Module) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _opens_weight_files(tree: ast.Module, package: str) -> list[str]:
    """What in a file reads a checkpoint's weights itself: a safetensors import, ``torch.load``,
    or the weight files' names in code (docstrings aside)."""
    found = sorted(n for n in _imported(tree, package) if n.split(".")[0] == "safetensors")
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", None) == "torch":
            found.append("torch.load")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and ("pytorch_model.bin" in node.value or ".safetensors" in node.value):
            found.append(repr(node.value))
    return found


def test_one_reader_of_checkpoint_files():
    readers = {f"{PACKAGES[package].name}/{path.name}": found
               for package in PACKAGES for path, tree in _modules(package)
               if (found := _opens_weight_files(tree, package))}
    assert list(readers) == ["sparsebert/checkpoint.py"], readers


@pytest.fixture(scope="module")
def saved_both_ways(tmp_path_factory):
    """One tiny BERT classifier saved as safetensors and as pytorch_model.bin."""
    model = tiny_bert(seed=3)
    folders = {}
    for safe in (True, False):
        folder = tmp_path_factory.mktemp("safetensors" if safe else "bin")
        model.save_pretrained(folder, safe_serialization=safe)
        folders[safe] = folder
    assert [p.name for p in folders[True].glob("*.safetensors")] == ["model.safetensors"]
    assert not list(folders[False].glob("*.safetensors")) and (folders[False] / "pytorch_model.bin").is_file()
    return model, folders[True], folders[False]


def test_a_checkpoint_reads_the_same_from_safetensors_and_bin(saved_both_ways):
    from sparsebert import checkpoint

    model, safe, binary = saved_both_ways
    expected = model.state_dict()
    for folder in (safe, binary):
        assert sorted(checkpoint.tensor_names(folder)) == sorted(expected)
        tensors = checkpoint.saved_tensors(folder)
        assert sorted(tensors) == sorted(expected)
        for name, tensor in tensors.items():
            assert isinstance(tensor, torch.Tensor) and tensor.dtype == expected[name].dtype
            assert torch.equal(tensor, expected[name]), name
        arrays = checkpoint.saved_tensors(folder, framework="np")
        weights = checkpoint.load_weights(folder)
        assert sorted(arrays) == sorted(weights) == sorted(expected)
        for name, array in arrays.items():
            assert isinstance(array, np.ndarray) and array.dtype == expected[name].numpy().dtype
            np.testing.assert_array_equal(array, expected[name].numpy())
            np.testing.assert_array_equal(weights[name], array)
        assert not checkpoint.is_quantized(folder)
    with pytest.raises(ValueError, match="framework"):
        checkpoint.saved_tensors(safe, framework="tf")


def _qat_state() -> dict[str, torch.Tensor]:
    """What quantization-aware training saves for one linear: the linear wrapped (``.module.``),
    its weight's fake-quantize state and an activation observer; plus a plain bfloat16 tensor."""
    g = torch.Generator().manual_seed(0)
    dense = "bert.encoder.layer.0.output.dense"
    return {f"{dense}.module.weight": torch.randn(4, 4, generator=g), f"{dense}.module.bias": torch.randn(4, generator=g),
            f"{dense}.weight_fake_quant.scale": torch.tensor([0.1]),
            f"{dense}.weight_fake_quant.zero_point": torch.tensor([0], dtype=torch.int32),
            f"{dense}.activation_post_process.observer_enabled": torch.tensor([1], dtype=torch.uint8),
            "classifier.weight": torch.randn(2, 4, generator=g).to(torch.bfloat16)}


def test_a_qat_checkpoint_reads_under_plain_names_from_either_format(tmp_path):
    from safetensors.torch import save_file

    from sparsebert import checkpoint

    state = _qat_state()
    (tmp_path / "safe").mkdir()
    (tmp_path / "bin").mkdir()
    save_file(state, str(tmp_path / "safe" / "model.safetensors"))
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    dense = "bert.encoder.layer.0.output.dense"
    for folder in (tmp_path / "safe", tmp_path / "bin"):
        assert checkpoint.is_quantized(folder)
        assert sorted(checkpoint.tensor_names(folder)) == sorted(state)
        raw = checkpoint.saved_tensors(folder)
        assert all(torch.equal(raw[name], tensor) and raw[name].dtype == tensor.dtype for name, tensor in state.items())
        weights = checkpoint.load_weights(folder)
        assert sorted(weights) == ["bert.encoder.layer.0.output.dense.bias",
                                   "bert.encoder.layer.0.output.dense.weight", "classifier.weight"]
        np.testing.assert_array_equal(weights[f"{dense}.weight"], state[f"{dense}.module.weight"].numpy())
        assert weights["classifier.weight"].dtype == np.float32  # numpy has no bfloat16
        np.testing.assert_array_equal(weights["classifier.weight"], state["classifier.weight"].float().numpy())


def test_pruned_patterns_come_from_the_recipe_beside_a_student_else_the_shipped_one(tmp_path):
    from sparsebert import checkpoint

    shipped = checkpoint.pruned_patterns()
    assert shipped and checkpoint.pruned_patterns(tmp_path) == shipped  # no recipe.yaml beside it
    assert checkpoint.is_pruned("bert.encoder.layer.0.output.dense.weight", shipped)
    assert checkpoint.is_pruned("encoder.layer.0.output.dense.weight", shipped)  # saved without the prefix
    assert not checkpoint.is_pruned("bert.embeddings.word_embeddings.weight", shipped)


def test_scores_go_through_the_model_label_order():
    """The core scoring: class ids through the model's own id2label, whatever the task's order."""
    from sparsebert import glue

    task = glue.get_task("mrpc")  # task order: not_equivalent, equivalent
    examples = [{"label": "equivalent"}, {"label": "not_equivalent"}, {"label": "equivalent"}]
    logits = np.array([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])  # ids 0, 1, 1
    scored = glue.score(task, logits, examples, {0: "equivalent", 1: "not_equivalent"})
    assert scored["accuracy"] == pytest.approx(200 / 3)
    answers = glue.score_answers(task, ["equivalent", "not_equivalent", "not_equivalent"], [0.9] * 3, examples)
    assert answers == scored


def test_a_half_precision_bin_keeps_its_dtype(tmp_path):
    """load_weights reads a .bin as safetensors are read: each tensor in its saved dtype (the
    old reader turned every .bin tensor into float32)."""
    from sparsebert import checkpoint

    weight = torch.randn(3, 3).half()
    torch.save({"bert.encoder.layer.0.output.dense.weight": weight}, tmp_path / "pytorch_model.bin")
    loaded = checkpoint.load_weights(tmp_path)["bert.encoder.layer.0.output.dense.weight"]
    assert loaded.dtype == np.float16
    np.testing.assert_array_equal(loaded, weight.numpy())
