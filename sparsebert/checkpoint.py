"""A checkpoint folder's saved tensors, and what they are: the one reader of a checkpoint's
weights (safetensors files, or ``pytorch_model.bin``; FP32 or quantization-aware), whether it
was saved by quantization-aware training, and which of its matrices the recipe prunes.

Training, export, parity, the benchmark and the data augmentation all read checkpoints here,
so a checkpoint means the same to each of them whichever format it was saved in.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sparsebert.errors import UserError

# The files a checkpoint's weights are in: safetensors (possibly sharded), else PyTorch's pickle.
SAFETENSORS = "*.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, PYTORCH_BIN)

# Saved state that only a quantization-aware (QAT) checkpoint has: fake-quantize observers.
_QAT_STATE = (".zero_point", ".observer_enabled")


def _safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob(SAFETENSORS))


def _torch_bin(model_dir: Path) -> dict:
    import torch

    return torch.load(Path(model_dir) / PYTORCH_BIN, map_location="cpu")


def read_trainer_file(path: Path):
    """A file a training checkpoint holds beside its weights (the recipe's state: step counts,
    schedule flags, masks), written by this project's own trainer: read whole, not weights-only."""
    import torch

    return torch.load(Path(path), map_location="cpu", weights_only=False)


def tensor_names(model_dir: Path) -> list[str]:
    """The names of a checkpoint's saved tensors, as saved; safetensors files are read without
    loading their tensors."""
    files = _safetensors_files(model_dir)
    if not files:
        return list(_torch_bin(model_dir).keys())
    from safetensors import safe_open

    names = []
    for f in files:
        with safe_open(str(f), framework="np") as handle:
            names += list(handle.keys())
    return names


def saved_tensors(model_dir: Path, framework: str = "pt") -> dict:
    """Every tensor a checkpoint saved, under its saved name: torch tensors (``framework="pt"``)
    or numpy arrays (``"np"``, of the same dtype; bfloat16, which numpy lacks, as float32),
    the same whether the checkpoint is in safetensors files or ``pytorch_model.bin``."""
    if framework not in ("pt", "np"):
        raise ValueError(f"framework must be 'pt' or 'np', not {framework!r}")
    files = _safetensors_files(model_dir)
    if files:
        from safetensors.torch import load_file

        state = {}
        for f in files:
            state.update(load_file(str(f)))
    else:
        state = _torch_bin(model_dir)
    return state if framework == "pt" else {name: _as_numpy(t) for name, t in state.items()}


def _as_numpy(tensor) -> np.ndarray:
    import torch

    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The saved weights of a checkpoint, read from disk (what a user would ship), under their
    plain names: a QAT checkpoint's ``...dense.module.weight`` is ``...dense.weight`` here, and
    its quantization state (scales, zero points, observers) is left out, so that sparsity and
    parameter counts mean the same for every checkpoint."""
    return {_plain_name(k): v for k, v in saved_tensors(model_dir, framework="np").items()
            if not _is_quantization_state(k)}


def is_quantized(model_dir: Path) -> bool:
    """Saved by quantization-aware training: observer state, or linears wrapped for it."""
    return any(name.endswith(_QAT_STATE) or name.endswith((".module.weight", ".module.bias"))
               for name in tensor_names(model_dir))


def _is_quantization_state(name: str) -> bool:
    return "activation_post_process" in name or "weight_fake_quant" in name


def _plain_name(name: str) -> str:
    """``...dense.module.weight`` (a linear wrapped for fake quantization) -> ``...dense.weight``."""
    return re.sub(r"\.module\.(weight|bias)$", r".\1", name)


def pruned_patterns(model_dir: Path | None = None) -> list[str]:
    """The matrices a checkpoint is measured on: the ``params`` of the pruning modifiers in the
    recipe SparseML saved beside it (a student), else the six linears a layer of its family
    (``sparsebert.families``: a dense teacher, the pre-trained model; BERT's with no folder), so
    both are measured on the same matrices."""
    from sparsebert import families
    from sparsebert.recipe import pruned_params

    saved = Path(model_dir) / "recipe.yaml" if model_dir else None
    patterns = pruned_params(saved) if saved and saved.is_file() else []
    return patterns or ((model_dir and families.of_folder(model_dir)) or families.BERT).pruned_params()


def is_pruned(name: str, patterns: list[str]) -> bool:
    """SparseML's own matching of a parameter name against recipe ``params`` (``re:`` prefixed
    regular expressions or exact names); a checkpoint saved without the model's prefix
    (``encoder...`` rather than ``bert.encoder...``) is matched with each family's prefix too:
    the patterns name one family's, and ``pruned_patterns`` gives a checkpoint its own family's."""
    from sparseml.pytorch.utils import any_str_or_regex_matches_param_name

    from sparsebert.families import PREFIXES

    return any(any_str_or_regex_matches_param_name(candidate, patterns)
               for candidate in (name, *(f"{prefix}.{name}" for prefix in PREFIXES)))


def sparsity_report(weights: dict[str, np.ndarray], patterns: list[str]) -> dict:
    """Per-matrix and overall zero fraction of the recipe's pruned matrices, and parameter counts."""
    per_matrix = {n: float((w == 0).mean()) for n, w in weights.items() if is_pruned(n, patterns)}
    if not per_matrix:
        raise UserError(f"the recipe's pruned params {patterns} match no weight of the checkpoint")
    prunable = sum(weights[n].size for n in per_matrix)
    zeros = sum(int((weights[n] == 0).sum()) for n in per_matrix)
    total = sum(w.size for w in weights.values())
    return {
        "encoder_linear_sparsity": zeros / prunable if prunable else 0.0,
        "per_matrix_sparsity": per_matrix,
        "min_matrix_sparsity": min(per_matrix.values()) if per_matrix else 0.0,
        "parameters_total": int(total),
        "parameters_encoder_linears": int(prunable),
        "parameters_nonzero_encoder_linears": int(prunable - zeros),
        "parameters_nonzero_total": int(total - zeros),
    }
