"""The FLOP bound on what sparsity can buy: how much faster a forward pass could be if the
pruned encoder linears cost only their kept weights and everything else stayed as it is.

Per token and layer, a BERT forward pass at sequence length n does (a multiply-add is 2 FLOPs):
- the six encoder linears: 2 (4 h^2 + 2 h i), the only work pruning removes;
- the attention matmuls (q.k and probabilities.v): 2 * 2 n h, dense whatever the sparsity;
- elementwise work (scale and mask 2 and softmax 5 per score; LayerNorm 8 per value, twice;
  GELU 8 per intermediate value; residual and bias adds), dense too.
With f the linears' share of the FLOPs and s their sparsity, Amdahl gives the bound
1 / ((1 - f) + f (1 - s)): 4.0x / 6.4x / 9.3x at 80 / 90 / 95% for all-MiniLM-L6-v2 at 128 tokens.
At batch 1 the memory-bound elementwise ops take more time than their FLOP share, so the real
ceiling is lower. INT8 is not in the bound: it makes the same FLOPs cheaper, not fewer.
"""

from __future__ import annotations

import json
from pathlib import Path


# A config.json's sizes under BERT's names, then DistilBERT's.
_SIZE_NAMES = {"hidden": ("hidden_size", "dim"), "intermediate": ("intermediate_size", "hidden_dim"),
               "heads": ("num_attention_heads", "n_heads"), "layers": ("num_hidden_layers", "n_layers")}


def _size(config: dict, size: str) -> int:
    for name in _SIZE_NAMES[size]:
        if name in config:
            return config[name]
    raise KeyError(f"config.json names no {size} size ({' or '.join(_SIZE_NAMES[size])})")


def forward_flops(config: dict, sequence_length: int) -> dict[str, float]:
    """FLOPs of one sequence's forward pass through the encoder, split as the module says."""
    h, i, heads = (_size(config, size) for size in ("hidden", "intermediate", "heads"))
    layers, n = _size(config, "layers"), sequence_length
    scores = heads * n * n
    per_layer = {
        "encoder_linears": 2 * (4 * h * h + 2 * h * i) * n,
        "attention_matmuls": 2 * 2 * n * n * h,
        "elementwise": 7 * scores + 2 * 8 * n * h + 8 * n * i + 2 * n * h + (5 * h + i) * n,
    }
    return {part: float(layers * flops) for part, flops in per_layer.items()}


def speed_bound(config: dict, sequence_length: int, sparsity: float) -> float:
    """The most a perfect sparse kernel could speed the pass up with all six linears at this sparsity."""
    flops = forward_flops(config, sequence_length)
    share = flops["encoder_linears"] / sum(flops.values())
    return 1.0 / ((1.0 - share) + share * (1.0 - sparsity))


def sparse_flops(config: dict, sequence_length: int, zeros: int) -> tuple[float, float]:
    """Dense FLOPs of the pass, and what is left when ``zeros`` weights of the linears cost
    nothing (each weight is one multiply-add per token, wherever it is)."""
    dense = sum(forward_flops(config, sequence_length).values())
    return dense, dense - 2.0 * sequence_length * zeros


def encoder_flops(weights: dict, patterns: list[str], sequence_length: int, config: dict) -> dict:
    """FLOPs per sequence: dense, and with the zeros of the pruned matrices (``patterns``)
    costing nothing; their ratio is the checkpoint's FLOP bound on speed."""
    import numpy as np

    from sparsebert.checkpoint import is_pruned

    linears = [w for n, w in weights.items() if is_pruned(n, patterns)]
    size = sum(w.size for w in linears)
    zeros = size - sum(int(np.count_nonzero(w)) for w in linears)
    dense, sparse = sparse_flops(config, sequence_length, zeros)
    return {
        "sequence_length": sequence_length,
        "dense_encoder_flops": dense,
        "sparse_encoder_flops": sparse,
        "encoder_flops_reduction": dense / max(sparse, 1),
        "linear_flops_reduction": size / max(size - zeros, 1),
        "encoder_linear_sparsity": zeros / size if size else 0.0,
    }


def bound_for(model_dir: Path, sequence_length: int) -> dict[str, float]:
    """A checkpoint's sparsity, measured in its saved weights, and its FLOP bound."""
    from sparsebert.checkpoint import load_weights, pruned_patterns

    config = json.loads((Path(model_dir) / "config.json").read_text())
    counts = encoder_flops(load_weights(model_dir), pruned_patterns(model_dir), sequence_length, config)
    return {"sparsity": counts["encoder_linear_sparsity"], "flop_bound": counts["encoder_flops_reduction"]}
