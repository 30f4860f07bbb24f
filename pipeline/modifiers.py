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

from sparsebert import sparseml_mends

__all__ = ["SparseBertDistillationModifier", "sparsebert_distillation_loss"]

_EMBEDDINGS = re.compile(r"(^|\.)embeddings$")
_HIDDEN = re.compile(r"encoder\.layer\.\d+\.output$")  # BertOutput: the layer's hidden state
_ATTENTION = re.compile(r"encoder\.layer\.\d+\.attention\.self\.dropout$")  # input: probabilities


def sparsebert_distillation_loss(student: Dict[str, List[torch.Tensor]], teacher: Dict[str, List[torch.Tensor]],
                                 student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 temperature: float, logits_weight: float, hidden_weight: float,
                                 attention_weight: float, hidden_normalize: bool = False) -> Dict[str, torch.Tensor]:
    """The paper's loss terms: soft cross-entropy on logits (MSE for a one-logit regression
    head), plus the sum over layers of hidden-state MSE and attention-probability MSE.

    ``hidden_normalize`` divides each layer's hidden-state MSE by the variance of the teacher's
    hidden state there (the share of it the student misses), so layers whose activations are
    large do not outweigh the rest, and the hidden term does not dwarf the logits.
    ``logits_kl`` (logged, not in the total) is the soft cross-entropy less the teacher's own
    entropy: 0 when the student's answers equal the teacher's."""
    if student_logits.shape[-1] == 1:
        logits = F.mse_loss(student_logits, teacher_logits)
        logits_kl = logits
    else:
        soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
        logits = -(soft_targets * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()
        entropy = -(soft_targets * F.log_softmax(teacher_logits / temperature, dim=-1)).sum(-1).mean()
        logits_kl = logits - entropy
    hidden_map, attention_map = layer_map(len(student["attention"]), len(teacher["attention"]))

    def hidden_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        error = F.mse_loss(s, t)
        return error / t.detach().float().var().clamp_min(1e-6) if hidden_normalize else error

    hidden = sum(hidden_term(student["hidden"][s], teacher["hidden"][t]) for s, t in hidden_map)
    attention = sum(F.mse_loss(student["attention"][s], teacher["attention"][t]) for s, t in attention_map)
    total = logits_weight * logits + hidden_weight * hidden + attention_weight * attention
    return {"logits_loss": logits, "hidden_loss": hidden, "attention_loss": attention, "distillation_loss": total,
            "logits_kl": logits_kl.detach()}


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
    |       hidden_normalize: false  # hidden MSE over the teacher's variance, per layer
    |       layer_terms_end_epoch: -1  # from this epoch on, logits only (TinyBERT's 2nd stage)
    |       grad_norm_every: 0     # every N training steps, log each term's gradient norm

    Total loss = (1 - hardness) * task_loss + hardness * distillation_loss.
    """

    def __init__(self, start_epoch: float = -1.0, end_epoch: float = -1.0,
                 update_frequency: float = -1.0, hardness: float = 1.0, temperature: float = 1.0,
                 logits_weight: float = 1.0, hidden_weight: float = 1.0, attention_weight: float = 1.0,
                 hidden_normalize: bool = False, layer_terms_end_epoch: float = -1.0, grad_norm_every: int = 0):
        super().__init__(start_epoch=start_epoch, end_epoch=end_epoch, update_frequency=update_frequency)
        for name, value in [("hardness", hardness), ("temperature", temperature), ("logits_weight", logits_weight),
                            ("hidden_weight", hidden_weight), ("attention_weight", attention_weight)]:
            if not isinstance(value, (int, float)) or value < 0 or (name == "hardness" and value > 1):
                raise ValueError(f"SparseBertDistillationModifier: {name} must be a number "
                                 f"{'in [0, 1]' if name == 'hardness' else '>= 0'}, got {value!r}")
        if not isinstance(hidden_normalize, bool):
            raise ValueError(f"SparseBertDistillationModifier: hidden_normalize must be true or false, "
                             f"got {hidden_normalize!r}")
        if not isinstance(layer_terms_end_epoch, (int, float)) or isinstance(layer_terms_end_epoch, bool):
            raise ValueError("SparseBertDistillationModifier: layer_terms_end_epoch must be a number, "
                             f"got {layer_terms_end_epoch!r}")
        if not isinstance(grad_norm_every, int) or isinstance(grad_norm_every, bool) or grad_norm_every < 0:
            raise ValueError(f"SparseBertDistillationModifier: grad_norm_every must be an integer >= 0, "
                             f"got {grad_norm_every!r}")
        if temperature <= 0:
            raise ValueError(f"SparseBertDistillationModifier: temperature must be > 0, got {temperature!r}")
        self._hardness = float(hardness)
        self._temperature = float(temperature)
        self._logits_weight = float(logits_weight)
        self._hidden_weight = float(hidden_weight)
        self._attention_weight = float(attention_weight)
        self._hidden_normalize = hidden_normalize
        self._layer_terms_end_epoch = float(layer_terms_end_epoch)
        self._grad_norm_every = grad_norm_every
        self._epoch = 0.0  # of the step being computed (SparseML passes it to loss_update)
        self._train_steps = 0
        self._grad_sums: Dict[str, float] = {}
        self._grad_counts: Dict[str, int] = {}
        self._student_params: List[torch.nn.Parameter] = []
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

    @ModifierProp()
    def hidden_normalize(self) -> bool:
        return self._hidden_normalize

    @hidden_normalize.setter
    def hidden_normalize(self, value: bool):
        self._hidden_normalize = value

    @ModifierProp()
    def layer_terms_end_epoch(self) -> float:
        return self._layer_terms_end_epoch

    @layer_terms_end_epoch.setter
    def layer_terms_end_epoch(self, value: float):
        self._layer_terms_end_epoch = value

    @ModifierProp()
    def grad_norm_every(self) -> int:
        return self._grad_norm_every

    @grad_norm_every.setter
    def grad_norm_every(self, value: int):
        self._grad_norm_every = value

    def layer_terms_active(self, epoch: float) -> bool:
        """Whether the hidden and attention terms are still in the loss at ``epoch``."""
        return self._layer_terms_end_epoch < 0 or epoch < self._layer_terms_end_epoch

    def initialize(self, module, epoch: float = 0, loggers=None, distillation_teacher="disable", **kwargs):
        sparseml_mends.require()  # every project recipe holds this modifier: no run trains unmended
        super().initialize(module, epoch, loggers, distillation_teacher, **kwargs)
        if not self._distillation_enabled:
            return
        if distillation_teacher == "self":
            raise ValueError("SparseBertDistillationModifier needs a fine-tuned teacher (--distill_teacher)")
        self._handles = _hook(module, self._student_cache) + _hook(self._teacher, self._teacher_cache)
        self._student_params = [p for p in module.parameters() if p.requires_grad]
        student_layers = len(self._student_cache["_names_hidden"])
        teacher_layers = len(self._teacher_cache["_names_hidden"])
        layer_map(student_layers, teacher_layers)  # refuses a student deeper than its teacher

    def loss_update(self, loss, module, optimizer, epoch, steps_per_epoch, **kwargs):
        self._epoch = float(epoch)
        # By keyword: SparseML's @log_call reads the epoch from kwargs to throttle its debug log.
        return super().loss_update(loss, module, optimizer, epoch=epoch, steps_per_epoch=steps_per_epoch, **kwargs)

    def compute_distillation_loss(self, student_outputs, teacher_outputs, **kwargs):
        layers_on = self.layer_terms_active(self._epoch)
        terms = sparsebert_distillation_loss(
            self._student_cache, self._teacher_cache, student_outputs["logits"], teacher_outputs["logits"],
            self._temperature, self._logits_weight, self._hidden_weight if layers_on else 0.0,
            self._attention_weight if layers_on else 0.0, self._hidden_normalize)
        self._logged_loss_terms.update({k: v for k, v in terms.items() if k != "distillation_loss"})
        if torch.is_grad_enabled():  # training steps only, not evaluation passes
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_steps += 1
            self._train_steps += 1
            if self._grad_norm_every and (self._train_steps - 1) % self._grad_norm_every == 0:
                self._measure_gradient_norms(terms, layers_on)
        return terms["distillation_loss"]

    def _measure_gradient_norms(self, terms: Dict[str, torch.Tensor], layers_on: bool) -> None:
        """The norm of each weighted term's gradient over the student's parameters: which term
        the update actually follows (their sizes alone do not say)."""
        weights = {"logits_loss": self._logits_weight, "hidden_loss": self._hidden_weight * layers_on,
                   "attention_loss": self._attention_weight * layers_on}
        for name, weight in weights.items():
            term = terms[name]
            if not weight or not term.requires_grad:
                norm = 0.0
            else:
                grads = torch.autograd.grad(weight * self._hardness * term, self._student_params,
                                            retain_graph=True, allow_unused=True)
                norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
            key = name.replace("_loss", "_grad_norm")
            self._grad_sums[key] = self._grad_sums.get(key, 0.0) + norm
            self._grad_counts[key] = self._grad_counts.get(key, 0) + 1

    def pop_mean_terms(self) -> Dict[str, float]:
        """Each loss term (and each measured gradient norm) averaged over the steps since the
        last call (for the training curve)."""
        means = {name: float(total) / max(self._term_steps, 1) for name, total in self._term_sums.items()}
        means.update({name: total / self._grad_counts[name] for name, total in self._grad_sums.items()})
        self._term_sums, self._term_steps = {}, 0
        self._grad_sums, self._grad_counts = {}, {}
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
