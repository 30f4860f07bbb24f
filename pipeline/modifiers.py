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
from sparseml.optim import ModifierProp
from sparseml.pytorch.sparsification.distillation.modifier_distillation_base import (
    BaseDistillationModifier,
)
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML

from sparsebert import families, sparseml_mends
from sparsebert.pipeline import distributed, loss_terms
from sparsebert.pipeline.loss_terms import LossOptions, distillation_loss, layer_map

__all__ = ["SparseBertDistillationModifier", "sparsebert_distillation_loss", "layer_map"]

_EMBEDDINGS = re.compile(r"(^|\.)embeddings$")
# ELECTRA's embeddings narrower than its layers: what enters the first layer is this projection's output.
_EMBEDDINGS_PROJECTION = re.compile(r"(^|\.)embeddings_project$")


def sparsebert_distillation_loss(student: Dict[str, List[torch.Tensor]], teacher: Dict[str, List[torch.Tensor]],
                                 student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 weights: Dict[str, float], options: LossOptions = LossOptions()) -> Dict[str, torch.Tensor]:
    """The paper's loss (``loss_terms.TERMS``: soft cross-entropy on logits, MSE for a one-logit
    regression head, plus the sum over layers of hidden-state and attention-probability MSE) on
    the hooked caches; ``weights`` maps each term's name to its weight."""
    return distillation_loss({**student, "logits": student_logits}, {**teacher, "logits": teacher_logits},
                             weights, options)


@PyTorchModifierYAML()
class SparseBertDistillationModifier(BaseDistillationModifier):
    """SparseBERT's knowledge distillation (TinyBERT's task-distillation loss).

    | Sample yaml:
    |   !SparseBertDistillationModifier
    |       start_epoch: 0.0
    |       hardness: 1.0          # weight of the distillation loss vs the task's own loss
    |       temperature: 1.0
    |       logits_weight: 1.0     # one <name>_weight per term of loss_terms.TERMS
    |       hidden_weight: 1.0
    |       attention_weight: 1.0
    |       hidden_normalize: false  # hidden MSE over the teacher's variance, per layer
    |       attention_scores: false  # attention MSE on the scores before softmax (TinyBERT)
    |       layer_terms_end_epoch: -1  # from this epoch on, logits only (TinyBERT's 2nd stage)
    |       grad_norm_every: 0     # every N training steps, log each term's gradient norm

    Total loss = (1 - hardness) * task_loss + hardness * distillation_loss.
    """

    def __init__(self, start_epoch: float = -1.0, end_epoch: float = -1.0,
                 update_frequency: float = -1.0, hardness: float = 1.0, temperature: float = 1.0,
                 hidden_normalize: bool = False, attention_scores: bool = False, layer_terms_end_epoch: float = -1.0, grad_norm_every: int = 0,
                 **term_weights: float):
        super().__init__(start_epoch=start_epoch, end_epoch=end_epoch, update_frequency=update_frequency)
        known = {term.weight for term in loss_terms.TERMS}
        unknown = sorted(set(term_weights) - known)
        if unknown:
            raise ValueError(f"SparseBertDistillationModifier: unknown argument(s) {', '.join(unknown)}; "
                             f"the loss terms' weights are {', '.join(sorted(known))}")
        weights = {term.name: term_weights.get(term.weight, 1.0) for term in loss_terms.TERMS}
        for name, value in [("hardness", hardness), ("temperature", temperature),
                            *((f"{term}_weight", weight) for term, weight in weights.items())]:
            if not isinstance(value, (int, float)) or value < 0 or (name == "hardness" and value > 1):
                raise ValueError(f"SparseBertDistillationModifier: {name} must be a number "
                                 f"{'in [0, 1]' if name == 'hardness' else '>= 0'}, got {value!r}")
        for name, value in [("hidden_normalize", hidden_normalize), ("attention_scores", attention_scores)]:
            if not isinstance(value, bool):
                raise ValueError(f"SparseBertDistillationModifier: {name} must be true or false, got {value!r}")
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
        self._weights = {name: float(weight) for name, weight in weights.items()}
        self._hidden_normalize = hidden_normalize
        self._attention_scores = attention_scores
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
    def hidden_normalize(self) -> bool:
        return self._hidden_normalize

    @hidden_normalize.setter
    def hidden_normalize(self, value: bool):
        self._hidden_normalize = value

    @ModifierProp()
    def attention_scores(self) -> bool:
        return self._attention_scores

    @attention_scores.setter
    def attention_scores(self, value: bool):
        self._attention_scores = value

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
        """Whether the layer terms (hidden, attention) are still in the loss at ``epoch``."""
        return self._layer_terms_end_epoch < 0 or epoch < self._layer_terms_end_epoch

    def applied_weights(self, epoch: float) -> Dict[str, float]:
        """Each term's weight in the loss at ``epoch``: the layer terms' are 0 once they end."""
        layers_on = self.layer_terms_active(epoch)
        return {term.name: self._weights[term.name] if layers_on or not term.per_layer else 0.0 for term in loss_terms.TERMS}

    def initialize(self, module, epoch: float = 0, loggers=None, distillation_teacher="disable", **kwargs):
        sparseml_mends.require()  # every project recipe holds this modifier: no run trains unmended
        super().initialize(module, epoch, loggers, distillation_teacher, **kwargs)
        if not self._distillation_enabled:
            return
        if distillation_teacher == "self":
            raise ValueError("SparseBertDistillationModifier needs a fine-tuned teacher (--distill_teacher)")
        self._handles = (_hook(module, self._student_cache, self._attention_scores)
                         + _hook(self._teacher, self._teacher_cache, self._attention_scores))
        self._student_params = [p for p in module.parameters() if p.requires_grad]
        student_layers = len(self._student_cache["_names_hidden"])
        teacher_layers = len(self._teacher_cache["_names_hidden"])
        layer_map(student_layers, teacher_layers)  # refuses a student deeper than its teacher

    def loss_update(self, loss, module, optimizer, epoch, steps_per_epoch, **kwargs):
        self._epoch = float(epoch)
        # By keyword: SparseML's @log_call reads the epoch from kwargs to throttle its debug log.
        return super().loss_update(loss, module, optimizer, epoch=epoch, steps_per_epoch=steps_per_epoch, **kwargs)

    def compute_distillation_loss(self, student_outputs, teacher_outputs, **kwargs):
        weights = self.applied_weights(self._epoch)
        terms = sparsebert_distillation_loss(
            self._student_cache, self._teacher_cache, student_outputs["logits"], teacher_outputs["logits"],
            weights, LossOptions(self._temperature, self._hidden_normalize, self._attention_scores))
        self._logged_loss_terms.update({k: v for k, v in terms.items() if k != "distillation_loss"})
        if torch.is_grad_enabled():  # training steps only, not evaluation passes
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_steps += 1
            self._train_steps += 1
            if self._grad_norm_every and (self._train_steps - 1) % self._grad_norm_every == 0:
                self._measure_gradient_norms(terms, weights)
        return terms["distillation_loss"]

    def _measure_gradient_norms(self, terms: Dict[str, torch.Tensor], weights: Dict[str, float]) -> None:
        """The norm of each weighted term's gradient over the student's parameters: which term
        the update actually follows (their sizes alone do not say)."""
        for loss_term in loss_terms.TERMS:
            weight, term = weights[loss_term.name], terms[loss_term.key]
            if not weight or not term.requires_grad:
                norm = 0.0
            else:
                grads = torch.autograd.grad(weight * self._hardness * term, self._student_params,
                                            retain_graph=True, allow_unused=True)
                norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
            key = loss_term.grad_norm_key
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
        if module is not None and hasattr(module, "config"):  # under torchrun: every rank's masks are the same
            distributed.check_same_masks(module, families.of_config(module.config).pruned_params())
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for cache in (self._student_cache, self._teacher_cache):  # the last step's tensors
            for value in cache.values():
                if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                    value.clear()
        super().finalize(module, reset_loggers, **kwargs)


def _weight_property(term_name: str) -> ModifierProp:
    """``<term>_weight`` as a recipe property (serialized in the saved recipe, fixed once the
    modifier is initialized), one per term of ``loss_terms.TERMS``."""
    def get(self) -> float:
        return self._weights[term_name]

    def set(self, value: float):
        self._weights[term_name] = value

    get.__name__ = f"{term_name}_weight"
    return ModifierProp()(get).setter(set)


_WEIGHT_PROPERTIES: set[str] = set()


def sync_weight_properties() -> None:
    """Give the modifier one ``<term>_weight`` property per declared term, and none for a term no
    longer declared (run at import; again by whoever changes ``loss_terms.TERMS`` at run time)."""
    declared = {term.weight: term.name for term in loss_terms.TERMS}
    for name in _WEIGHT_PROPERTIES - set(declared):
        delattr(SparseBertDistillationModifier, name)
    for name, term_name in declared.items():
        if name not in _WEIGHT_PROPERTIES:
            setattr(SparseBertDistillationModifier, name, _weight_property(term_name))
    _WEIGHT_PROPERTIES.clear()
    _WEIGHT_PROPERTIES.update(declared)


sync_weight_properties()


def _hook(model: torch.nn.Module, cache: Dict[str, list], projections: bool = False) -> list:
    """Hooks that keep, for each forward pass, the embeddings output, each layer's hidden state
    and attention probabilities and, with ``projections`` (for the attention scores), its query
    and key projections, in layer order, in ``cache``. Which modules those are depends on the
    model's family (``sparsebert.families``)."""
    family = families.of_config(model.config)
    named = list(model.named_modules())

    def find(below_layer: str | None) -> list:
        pattern = family.module_pattern(below_layer) if below_layer else None
        return [(n, m) for n, m in named if pattern and pattern.search(n)]

    embeddings = [m for n, m in named if _EMBEDDINGS.search(n) and "encoder" not in n][:1]
    first_input = [m for n, m in named if _EMBEDDINGS_PROJECTION.search(n)][:1] or embeddings
    hidden, attention = find(family.hidden), find(family.attention_probs)
    queries, keys = (find(family.query), find(family.key)) if projections else ([], [])
    heads = {getattr(m, family.heads_attribute, None) for _, m in find(family.self_attention)}
    if projections and (not queries or len(queries) != len(keys) or len(heads) != 1 or None in heads):
        raise ValueError(f"attention_scores: {family.name}'s attention scores cannot be rebuilt from its query "
                         "and key projections; use the attention probabilities (attention_scores: false)")
    if not hidden or len(attention) != len(hidden):
        raise ValueError(f"the {family.name} model has {len(hidden)} layer outputs and {len(attention)} attention "
                         "dropouts where the distillation looks for one of each per layer")
    cache.update(hidden=[], attention=[], queries=[], keys=[], heads=heads.pop() if projections else None,
                 _names_hidden=[n for n, _ in hidden])
    hidden, attention, queries, keys = ([m for _, m in found] for found in (hidden, attention, queries, keys))

    def start_pass(module, args):  # a new forward pass begins at the embeddings
        for name in ("hidden", "attention", "queries", "keys"):
            cache[name].clear()

    def keep_output(module, args, output):
        cache["hidden"].append(output)

    def keep_input(module, args):
        cache["attention"].append(args[0])

    handles = [m.register_forward_pre_hook(start_pass) for m in embeddings]
    handles += [m.register_forward_hook(keep_output) for m in first_input + hidden]
    handles += [m.register_forward_pre_hook(keep_input) for m in attention]
    handles += [m.register_forward_hook(lambda module, args, output: cache["queries"].append(output)) for m in queries]
    handles += [m.register_forward_hook(lambda module, args, output: cache["keys"].append(output)) for m in keys]
    return handles
