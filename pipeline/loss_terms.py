"""The distillation loss terms, declared once.

Everything that names a term reads ``TERMS``: the modifier's arguments and recipe properties
(``<name>_weight``), the recipes' variables and distillation block (``recipes/build.py`` writes
them), what the curve keeps (``<name>_loss``, ``<name>_grad_norm``) and plots. A new term is
one ``LossTerm`` here, then ``python -m sparsebert.recipes.build``.

Each term's ``compute`` takes the student's and the teacher's outputs, dictionaries of
``logits`` (tensor), ``hidden`` (embeddings output then every layer's hidden state) and
``attention`` (every layer's attention probabilities), ``queries`` and ``keys`` (every layer's
query and key projections), ``heads`` (attention heads per layer), and the ``LossOptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

Outputs = Dict[str, object]


@dataclass(frozen=True)
class LossOptions:
    temperature: float = 1.0
    hidden_normalize: bool = False  # each layer's hidden MSE over the teacher's variance there
    attention_scores: bool = False  # the attention MSE on the scores before softmax, not the probabilities


@dataclass(frozen=True)
class LossTerm:
    name: str
    per_layer: bool  # a layer term: left out of the loss from layer_terms_end_epoch on
    compute: Callable[[Outputs, Outputs, LossOptions], torch.Tensor]
    doc: str  # one line, written beside its weight in the recipes

    @property
    def weight(self) -> str:
        return f"{self.name}_weight"

    @property
    def key(self) -> str:
        return f"{self.name}_loss"

    @property
    def grad_norm_key(self) -> str:
        return f"{self.name}_grad_norm"


def layer_map(student_layers: int, teacher_layers: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Which teacher output each student output learns from, as (student, teacher) index pairs:
    hidden states (index 0 is the embeddings output) and attention probabilities. One to one when
    the depths agree; a shallower student (a small dense model of the same width) takes every
    (teacher / student)-th teacher layer, TinyBERT's uniform mapping, so its last layer learns
    from the teacher's last."""
    if student_layers < 1 or student_layers > teacher_layers:
        raise ValueError(f"student has {student_layers} BERT layers, teacher {teacher_layers}: "
                         "SparseBertDistillationModifier needs 1 to as many layers as the teacher")
    teacher_of = [(layer + 1) * teacher_layers // student_layers for layer in range(student_layers)]
    hidden = [(0, 0)] + [(layer + 1, t) for layer, t in enumerate(teacher_of)]
    attention = [(layer, t - 1) for layer, t in enumerate(teacher_of)]
    return hidden, attention


def _maps(student: Outputs, teacher: Outputs):
    return layer_map(len(student["attention"]), len(teacher["attention"]))


def soft_cross_entropy(student: Outputs, teacher: Outputs, options: LossOptions) -> torch.Tensor:
    """Soft cross-entropy on the logits at the temperature; MSE for a one-logit regression head."""
    if student["logits"].shape[-1] == 1:
        return F.mse_loss(student["logits"], teacher["logits"])
    soft_targets = F.softmax(teacher["logits"] / options.temperature, dim=-1)
    return -(soft_targets * F.log_softmax(student["logits"] / options.temperature, dim=-1)).sum(-1).mean()


def hidden_mse(student: Outputs, teacher: Outputs, options: LossOptions) -> torch.Tensor:
    """Sum over the mapped layers of the hidden-state MSE (over the teacher's variance, when
    normalized, so layers whose activations are large do not outweigh the rest)."""
    def one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        error = F.mse_loss(s, t)
        return error / t.detach().float().var().clamp_min(1e-6) if options.hidden_normalize else error

    hidden_map, _ = _maps(student, teacher)
    return sum(one(student["hidden"][s], teacher["hidden"][t]) for s, t in hidden_map)


def attention_scores(outputs: Outputs, layer: int, keep: torch.Tensor) -> torch.Tensor:
    """One layer's attention scores, q.k / sqrt(head size) per head, before the mask and softmax
    (Hugging Face's BERT never exposes them, so they are rebuilt from the hooked projections);
    0 where ``keep`` is false (padded keys), as TinyBERT's loss does."""
    query, key = outputs["queries"][layer].float(), outputs["keys"][layer].float()
    batch, length, width = query.shape
    heads = outputs["heads"]
    query = query.view(batch, length, heads, width // heads).transpose(1, 2)
    key = key.view(batch, key.shape[1], heads, width // heads).transpose(1, 2)
    scores = query @ key.transpose(-1, -2) / math.sqrt(width // heads)
    return torch.where(keep, scores, torch.zeros((), dtype=scores.dtype))


def attention_mse(student: Outputs, teacher: Outputs, options: LossOptions) -> torch.Tensor:
    """Sum over the mapped layers of the attention-probability MSE, or of the attention-score MSE
    (TinyBERT's and the SparseBERT authors' loss) with ``attention_scores``."""
    _, attention_map = _maps(student, teacher)
    if not options.attention_scores:
        return sum(F.mse_loss(student["attention"][s], teacher["attention"][t]) for s, t in attention_map)
    total = 0.0
    for s, t in attention_map:
        keep = teacher["attention"][t] > 0  # a padded key's probability is exactly 0
        total = total + F.mse_loss(attention_scores(student, s, keep), attention_scores(teacher, t, keep))
    return total


TERMS = (
    LossTerm("logits", False, soft_cross_entropy, "soft cross-entropy on the logits (MSE for STS-B)"),
    LossTerm("hidden", True, hidden_mse, "MSE on the hidden states, embeddings output and every layer"),
    LossTerm("attention", True, attention_mse, "MSE on every layer's attention probabilities (or scores)"),
)

# Logged beside the terms, never in the loss: the logits term less the teacher's own entropy
# (0 when the student's answers equal the teacher's).
DIAGNOSTICS = ("logits_kl",)


def logits_kl(student: Outputs, teacher: Outputs, options: LossOptions, logits_term: torch.Tensor) -> torch.Tensor:
    if student["logits"].shape[-1] == 1:
        return logits_term.detach()
    soft_targets = F.softmax(teacher["logits"] / options.temperature, dim=-1)
    entropy = -(soft_targets * F.log_softmax(teacher["logits"] / options.temperature, dim=-1)).sum(-1).mean()
    return (logits_term - entropy).detach()


def distillation_loss(student: Outputs, teacher: Outputs, weights: Dict[str, float],
                      options: LossOptions = LossOptions()) -> Dict[str, torch.Tensor]:
    """Every term (``<name>_loss``), the diagnostics, and their weighted sum
    (``distillation_loss``); ``weights`` maps a term's name to its weight (0 leaves it out of
    the sum, still logged)."""
    values = {term.key: term.compute(student, teacher, options) for term in TERMS}
    total = sum(weights[term.name] * values[term.key] for term in TERMS)
    return {**values, "distillation_loss": total,
            "logits_kl": logits_kl(student, teacher, options, values["logits_loss"])}
