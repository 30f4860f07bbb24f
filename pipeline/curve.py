"""The training curve: at every logging step, what the optimizer that steps really applied
(its learning rate), the sparsity the recipe's pruned matrices reached, and each distillation
term averaged since the last log. The Trainer's own ``learning_rate`` is the scheduler's
belief; SparseML 1.8's wrapper once made the two differ for a whole run unnoticed.

``TrainingCurve`` is attached to every SparseML trainer (``sparsebert.sparseml_mends``), so the
values land in ``trainer_state.json``; ``write`` turns that into ``curve.json`` and ``curve.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from sparsebert import atomic
from sparsebert.pipeline import loss_terms


def loss_keys() -> tuple[str, ...]:
    """Each declared distillation term's key, then the diagnostics (``loss_terms``)."""
    return (*(term.key for term in loss_terms.TERMS), *loss_terms.DIAGNOSTICS)


def grad_norm_keys() -> tuple[str, ...]:
    return tuple(term.grad_norm_key for term in loss_terms.TERMS)


def curve_keys() -> tuple[str, ...]:
    """What ``curve.json`` keeps of each logged step, besides step, epoch, loss and LR."""
    return ("applied_learning_rate", "sparsity", *loss_keys(), "distillation_loss", *grad_norm_keys())


def optimizer_layers(optimizer):
    """The optimizer and each one it wraps, outermost first: Accelerate's AcceleratedOptimizer,
    SparseML's ScheduledOptimizer (which holds a ``_wrapper``), then the torch optimizer."""
    while optimizer is not None:
        yield optimizer
        inner = vars(optimizer).get("_wrapper")
        optimizer = inner.wrapped_optimizer if inner is not None else vars(optimizer).get("optimizer")


def stepping_optimizer(optimizer):
    """The torch optimizer that applies the update, under Accelerate's and SparseML's wrappers."""
    *_, innermost = optimizer_layers(optimizer)
    return innermost


def scheduled_optimizer(optimizer):
    """SparseML's ScheduledOptimizer among the layers, or None (a run without a recipe)."""
    return next((layer for layer in optimizer_layers(optimizer) if "_wrapper" in vars(layer)), None)


def pruned_parameters(model, manager) -> list:
    """The parameters the recipe's pruning modifiers prune (their ``params``, resolved)."""
    from sparseml.pytorch.utils import get_named_layers_and_params_by_regex

    patterns = [p for m in (manager.pruning_modifiers if manager else [])
                for p in ([m.params] if isinstance(m.params, str) else m.params)]
    return [named.param for named in get_named_layers_and_params_by_regex(model, patterns)] if patterns else []


class TrainingCurve(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.applied_learning_rate = None

    def on_step_begin(self, args, state, control, **kwargs):
        # Before the step: the rate this step applies (after it, the scheduler has moved on).
        if self.trainer.optimizer is not None:
            self.applied_learning_rate = stepping_optimizer(self.trainer.optimizer).param_groups[0]["lr"]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.log_history or "loss" not in state.log_history[-1] or self.applied_learning_rate is None:
            return
        entry = state.log_history[-1]
        entry["applied_learning_rate"] = self.applied_learning_rate  # by the window's last step
        manager = getattr(self.trainer, "manager", None)
        params = pruned_parameters(self.trainer.model, manager)
        if params:
            zeros = sum(int((p == 0).sum()) for p in params)
            entry["sparsity"] = zeros / sum(p.numel() for p in params)
        for modifier in (manager.distillation_modifiers if manager else []):
            if hasattr(modifier, "pop_mean_terms"):
                entry.update(modifier.pop_mean_terms())


def read(model_dir: Path) -> list[dict]:
    """The training-step entries of a checkpoint's log history (``trainer_state.json``)."""
    path = Path(model_dir) / "trainer_state.json"
    if not path.is_file():
        return []
    history = json.loads(path.read_text())["log_history"]
    return [{k: e[k] for k in ("step", "epoch", "loss", "learning_rate", *curve_keys()) if k in e}
            for e in history if "loss" in e]


def write(model_dir: Path, title: str) -> list[dict]:
    """``curve.json`` and ``curve.png`` in ``model_dir``, from its log history."""
    curve = read(model_dir)
    atomic.write_json(Path(model_dir) / "curve.json", curve, indent=1)
    if curve:
        fig = plot(curve, title)
        import matplotlib.pyplot as plt

        atomic.save_figure(fig, Path(model_dir) / "curve.png", dpi=90)
        plt.close(fig)
    return curve


def plot(curve: list[dict], title: str):
    """The curve's figure: every loss term and the total; applied LR and sparsity; each term's
    gradient norm, where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in curve]
    grad_norms = grad_norm_keys()
    with_grads = any(key in e for e in curve for key in grad_norms)
    fig, panels = plt.subplots(1, 3 if with_grads else 2, figsize=(16 if with_grads else 11, 4))
    losses, schedule = panels[0], panels[1]
    for key in ("loss", *loss_keys()):
        if key in curve[0]:
            losses.plot(steps, [e[key] for e in curve], label="total" if key == "loss" else key.removesuffix("_loss"))
    losses.set(xlabel="step", ylabel="training loss (mean over the logging window)", yscale="log")
    losses.legend()
    schedule.plot(steps, [e.get("applied_learning_rate", float("nan")) for e in curve], label="applied LR", color="C0")
    schedule.set(xlabel="step", ylabel="learning rate applied by the optimizer")
    if "sparsity" in curve[0]:
        sparsity = schedule.twinx()
        sparsity.plot(steps, [e["sparsity"] * 100 for e in curve], color="C3", label="sparsity")
        sparsity.set(ylabel="sparsity of the pruned matrices (%)", ylim=(0, 100))
        sparsity.legend(loc="center right")
    schedule.legend(loc="upper right")
    if with_grads:
        for key in grad_norms:
            points = [(e["step"], e[key]) for e in curve if key in e]
            if points:
                panels[2].plot(*zip(*points), label=key.removesuffix("_grad_norm"))
        panels[2].set(xlabel="step", ylabel="gradient norm of each weighted term", yscale="symlog")
        panels[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
