"""The project's SparseML modifier: SparseBERT's distillation loss in one teacher pass.

Why not SparseML's own ``DistillationModifier`` + ``PerLayerDistillationModifier`` (1.8.0):
- ``PerLayerDistillationModifier`` adds a parameter group to the optimizer after the LR
  scheduler was built; with torch >= 2.2 every scheduler step then fails
  (``zip() argument 2 is shorter than argument 1``), even with ``project_features: false``.
- It caches module *outputs* only; the attention probabilities are only ever the output of
  ``attention.self.dropout``, i.e. dropped and rescaled during training. This modifier reads
  that module's *input*, the probabilities themselves.
- It needs every layer's name spelled out, so one recipe could not serve models of any depth,
  nor a student shallower than its teacher.
- ``DistillationModifier`` uses KL on softmax outputs, which is zero for a one-logit regression
  head (STS-B); and two modifiers run the teacher twice per step.

Importing this module registers ``!SparseBertDistillationModifier`` with SparseML's recipe
loader (done at interpreter start-up by the ``sparsebert_modifiers.pth`` hook, so SparseML's own
console scripts can read the project's recipes).
"""

from __future__ import annotations

import re
from typing import Dict, List

import torch
import torch.nn.functional as F
from sparseml.optim import ModifierProp
from sparseml.pytorch.sparsification.distillation.modifier_distillation_base import (
    BaseDistillationModifier,
)
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML

__all__ = ["SparseBertDistillationModifier", "sparsebert_distillation_loss"]

_EMBEDDINGS = re.compile(r"(^|\.)embeddings$")
_HIDDEN = re.compile(r"encoder\.layer\.\d+\.output$")  # BertOutput: the layer's hidden state
_ATTENTION = re.compile(r"encoder\.layer\.\d+\.attention\.self\.dropout$")  # input: probabilities


def sparsebert_distillation_loss(student: Dict[str, List[torch.Tensor]], teacher: Dict[str, List[torch.Tensor]],
                                 student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 temperature: float, logits_weight: float, hidden_weight: float,
                                 attention_weight: float) -> Dict[str, torch.Tensor]:
    """The paper's loss terms: soft cross-entropy on logits (MSE for a one-logit regression
    head), plus the sum over layers of hidden-state MSE and attention-probability MSE."""
    if student_logits.shape[-1] == 1:
        logits = F.mse_loss(student_logits, teacher_logits)
    else:
        soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
        logits = -(soft_targets * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()
    hidden_map, attention_map = layer_map(len(student["attention"]), len(teacher["attention"]))
    hidden = sum(F.mse_loss(student["hidden"][s], teacher["hidden"][t]) for s, t in hidden_map)
    attention = sum(F.mse_loss(student["attention"][s], teacher["attention"][t]) for s, t in attention_map)
    total = logits_weight * logits + hidden_weight * hidden + attention_weight * attention
    return {"logits_loss": logits, "hidden_loss": hidden, "attention_loss": attention, "distillation_loss": total}


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


@PyTorchModifierYAML()
class SparseBertDistillationModifier(BaseDistillationModifier):
    """SparseBERT's knowledge distillation (TinyBERT's task-distillation loss).

    | Sample yaml:
    |   !SparseBertDistillationModifier
    |       start_epoch: 0.0
    |       hardness: 1.0          # weight of the distillation loss vs the task's own loss
    |       temperature: 1.0
    |       logits_weight: 1.0
    |       hidden_weight: 1.0
    |       attention_weight: 1.0

    Total loss = (1 - hardness) * task_loss + hardness * distillation_loss.
    """

    def __init__(self, start_epoch: float = -1.0, end_epoch: float = -1.0,
                 update_frequency: float = -1.0, hardness: float = 1.0, temperature: float = 1.0,
                 logits_weight: float = 1.0, hidden_weight: float = 1.0, attention_weight: float = 1.0):
        super().__init__(start_epoch=start_epoch, end_epoch=end_epoch, update_frequency=update_frequency)
        for name, value in [("hardness", hardness), ("temperature", temperature), ("logits_weight", logits_weight),
                            ("hidden_weight", hidden_weight), ("attention_weight", attention_weight)]:
            if not isinstance(value, (int, float)) or value < 0 or (name == "hardness" and value > 1):
                raise ValueError(f"SparseBertDistillationModifier: {name} must be a number "
                                 f"{'in [0, 1]' if name == 'hardness' else '>= 0'}, got {value!r}")
        if temperature <= 0:
            raise ValueError(f"SparseBertDistillationModifier: temperature must be > 0, got {temperature!r}")
        self._hardness = float(hardness)
        self._temperature = float(temperature)
        self._logits_weight = float(logits_weight)
        self._hidden_weight = float(hidden_weight)
        self._attention_weight = float(attention_weight)
        self._term_sums: Dict[str, torch.Tensor] = {}  # since the last pop_mean_terms()
        self._term_steps = 0
        self._student_cache: Dict[str, list] = {}
        self._teacher_cache: Dict[str, list] = {}
        self._handles = []

    @ModifierProp()
    def hardness(self) -> float:
        return self._hardness

    @hardness.setter
    def hardness(self, value: float):
        self._hardness = value

    @ModifierProp()
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float):
        self._temperature = value

    @ModifierProp()
    def logits_weight(self) -> float:
        return self._logits_weight

    @logits_weight.setter
    def logits_weight(self, value: float):
        self._logits_weight = value

    @ModifierProp()
    def hidden_weight(self) -> float:
        return self._hidden_weight

    @hidden_weight.setter
    def hidden_weight(self, value: float):
        self._hidden_weight = value

    @ModifierProp()
    def attention_weight(self) -> float:
        return self._attention_weight

    @attention_weight.setter
    def attention_weight(self, value: float):
        self._attention_weight = value

    def initialize(self, module, epoch: float = 0, loggers=None, distillation_teacher="disable", **kwargs):
        super().initialize(module, epoch, loggers, distillation_teacher, **kwargs)
        if not self._distillation_enabled:
            return
        if distillation_teacher == "self":
            raise ValueError("SparseBertDistillationModifier needs a fine-tuned teacher (--distill_teacher)")
        self._handles = _hook(module, self._student_cache) + _hook(self._teacher, self._teacher_cache)
        student_layers = len(self._student_cache["_names_hidden"])
        teacher_layers = len(self._teacher_cache["_names_hidden"])
        layer_map(student_layers, teacher_layers)  # refuses a student deeper than its teacher

    def compute_distillation_loss(self, student_outputs, teacher_outputs, **kwargs):
        terms = sparsebert_distillation_loss(
            self._student_cache, self._teacher_cache, student_outputs["logits"], teacher_outputs["logits"],
            self._temperature, self._logits_weight, self._hidden_weight, self._attention_weight)
        self._logged_loss_terms.update({k: v for k, v in terms.items() if k != "distillation_loss"})
        if torch.is_grad_enabled():  # training steps only, not evaluation passes
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_steps += 1
        return terms["distillation_loss"]

    def pop_mean_terms(self) -> Dict[str, float]:
        """Each loss term averaged over the steps since the last call (for the training curve)."""
        means = {name: float(total) / max(self._term_steps, 1) for name, total in self._term_sums.items()}
        self._term_sums, self._term_steps = {}, 0
        return means

    def compute_total_loss(self, loss, distillation_loss):
        return (1.0 - self._hardness) * loss + self._hardness * distillation_loss

    def finalize(self, module=None, reset_loggers: bool = True, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().finalize(module, reset_loggers, **kwargs)


def _hook(model: torch.nn.Module, cache: Dict[str, list]) -> list:
    """Hooks that keep, for each forward pass, the embeddings output, each layer's hidden state
    and each layer's attention probabilities (in layer order) in ``cache``."""
    named = list(model.named_modules())
    embeddings = [m for n, m in named if _EMBEDDINGS.search(n) and "encoder" not in n][:1]
    hidden = [m for n, m in named if _HIDDEN.search(n)]
    attention = [m for n, m in named if _ATTENTION.search(n)]
    cache.update(hidden=[], attention=[], _names_hidden=[n for n, _ in named if _HIDDEN.search(n)])

    def start_pass(module, args):  # a new forward pass begins at the embeddings
        cache["hidden"].clear()
        cache["attention"].clear()

    def keep_output(module, args, output):
        cache["hidden"].append(output)

    def keep_input(module, args):
        cache["attention"].append(args[0])

    handles = [m.register_forward_pre_hook(start_pass) for m in embeddings]
    handles += [m.register_forward_hook(keep_output) for m in embeddings + hidden]
    handles += [m.register_forward_pre_hook(keep_input) for m in attention]
    return handles
