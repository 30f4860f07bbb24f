"""The SparseML/DeepSparse 1.8 stack is frozen upstream, so its bugs are the project's: each one
is mended here, in one place, when the module that holds it is imported (``sparsebert._startup``
runs these hooks for every entry point: ``sparsebert train``/``serve``, SparseML's own console
scripts and the stock ``deepsparse.server``). Each mend names what it mends and has a test in
``tests/test_sparseml_mends.py``. The project's own entry points also call ``apply()``
explicitly, and ``require()`` (run by the recipe's distillation modifier and the training stage)
refuses a process whose SparseML loaded unmended, so no copy trains at a learning rate of 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sparsebert.errors import UserError

# ---------------------------------------------------------------- SparseML


def mend_scheduled_optimizer(module) -> None:
    """``ScheduledOptimizer`` (the optimizer wrapper SparseML's trainer uses with a recipe) does
    not call ``Optimizer.__init__`` and forwards unknown attributes to the optimizer it wraps,
    but it inherits torch's ``state_dict``/``load_state_dict``. Accelerate prepares an
    optimizer with ``load_state_dict(state_dict())``; torch's version then stores *new*
    ``param_groups`` in the wrapper's own ``__dict__``. From then on the LR scheduler sets the
    learning rate on those copies while the AdamW that steps keeps warm-up's first value, 0:
    the student never trained. The same stale copy was saved as ``optimizer.pt`` (no moments).
    Route the state of the optimizer through to the one that steps."""
    wrapper = module.ScheduledOptimizer

    def wrapped(self):
        return self.__dict__["_wrapper"].wrapped_optimizer

    wrapper.state_dict = lambda self: wrapped(self).state_dict()
    wrapper.load_state_dict = lambda self, state_dict: wrapped(self).load_state_dict(state_dict)
    wrapper.add_param_group = lambda self, group: wrapped(self).add_param_group(group)
    wrapper.zero_grad = lambda self, set_to_none=True: wrapped(self).zero_grad(set_to_none=set_to_none)
    wrapper.param_groups = property(lambda self: wrapped(self).param_groups)
    wrapper.state = property(lambda self: wrapped(self).state)


def mend_text_classification(module) -> None:
    """Two mends in SparseML's text-classification script:

    - ``_get_label_info`` never sets ``label_list`` for a regression task (STS-B), so the script
      stopped with ``UnboundLocalError`` with or without ``--task_name stsb``. A regression
      label column now yields ``label_list=None`` (the script only reads it for classification).
    - the script always loads the hub's "accuracy" metric script, though with train/validation
      files it computes accuracy itself and never uses it; offline that load raises. Only that
      case is answered with None; every other load is unchanged.
    """
    get_label_info = module._get_label_info

    def get_label_info_with_regression(data_args, raw_datasets):
        column = data_args.label_column_name
        if data_args.task_name is not None:
            regression = data_args.task_name == "stsb"
        else:
            regression = raw_datasets["train"].features[column].dtype in ("float32", "float64")
        if regression:
            return True, column, None, 1, False
        return get_label_info(data_args, raw_datasets)

    module._get_label_info = get_label_info_with_regression

    load_metric = module.load_metric

    def load_metric_offline(path, *args, **kwargs):
        try:
            return load_metric(path, *args, **kwargs)
        except (ConnectionError, FileNotFoundError, OSError):
            if path == "accuracy" and os.environ.get("HF_DATASETS_OFFLINE") == "1":
                return None
            raise

    module.load_metric = load_metric_offline


def mend_trainer(module) -> None:
    """SparseML's ``Trainer``:

    - ``_load_optimizer_and_scheduler`` also loads ``optimizer.pt``/``scheduler.pt`` from the
      *model* folder when no checkpoint is resumed, so a run that starts from a fine-tuned
      folder (one saved by this trainer) silently inherits its finished schedule, at a learning
      rate near 0. A new run now starts fresh; ``--resume_from_checkpoint`` still resumes.
    - with gradient accumulation, its recipe counted ``ceil(examples / (batch x accumulation))``
      optimizer steps per epoch where the Hugging Face trainer takes ``batches // accumulation``,
      so the recipe's epochs ran slower than the trainer's and pruning could end late or never
      reach its target. The recipe now counts the trainer's own steps per epoch.
    - ``_data_loader_builder`` (the gradient sampler of second-order pruning, OBS) rebuilt the
      train dataloader as ``type(loader)(**loader.__dict__)``; Accelerate's prepared loader
      (``DataLoaderShard``) cannot be rebuilt from its attributes, so ``recipes/sparsebert-obs.yaml``
      stopped at its first mask update with a ``TypeError``. It now samples the trainer's own
      train dataloader (or, when a recipe's ``grad_sampler_kwargs`` ask for another batch size,
      a plain DataLoader over the same data and collator).
    - it overrides the trainer's ``num_train_epochs`` with the recipe's length rounded *up* to
      whole epochs (``manager.max_epochs`` takes ``math.ceil`` of every modifier's epochs), so
      a recipe of 0.9 epochs trained a whole epoch: the learning rate fell over 1.0 epochs while
      the pruning schedule, ended at 0.9, left the last tenth at the target with the rate
      still high. The trainer now runs the recipe's own (fractional) length.
    - resuming a checkpoint restarted the recipe at epoch 0: the optimizer wrapper always counts
      its steps from 0, and nothing of the recipe's state (which modifiers started, when the masks
      were last updated, the masks) is saved, so pruning began again on a pruned model while the
      learning rate went on from the checkpoint. Each checkpoint now also holds the recipe's
      state (``RECIPE_STATE``, written last, so a checkpoint without it is incomplete), and a
      resumed trainer starts the recipe where it stopped; resuming a recipe's checkpoint without
      it is refused. And the length-grouped sampler drew each epoch's order from the global
      random state, which a resumed run reaches by another path: each epoch's order now depends
      on the seed and the epoch alone, so a resumed run sees the batches an uninterrupted one does.
      And the Hugging Face trainer of this stack reads its checkpoint's random states with torch's
      default ``weights_only`` load, which torch >= 2.6 refuses for the NumPy state inside: every
      resume failed there. The NumPy types of that state are allowed for that load.
    - every trainer records a training curve (``sparsebert.pipeline.curve``): the learning rate
      the stepping optimizer applied, the sparsity reached and each distillation term, in
      ``trainer_state.json``'s log history. (An addition, not a mend: SparseML's trainer takes
      no callbacks from its script's arguments.)
    """
    trainer = module.Trainer
    load = trainer._load_optimizer_and_scheduler

    def load_only_when_resuming(self, checkpoint):
        if checkpoint is None:
            return None
        return load(self, checkpoint)

    trainer._load_optimizer_and_scheduler = load_only_when_resuming

    init = trainer.__init__

    def init_with_curve(self, *args, **kwargs):
        init(self, *args, **kwargs)
        recipe_epochs = _recipe_length(self.manager)
        if recipe_epochs and recipe_epochs < self.args.num_train_epochs:
            self.args.num_train_epochs = recipe_epochs
        from sparsebert.pipeline.curve import TrainingCurve

        self.add_callback(_RecipeCountsTrainerSteps(self))
        self.add_callback(_RecipeResumes(self))  # after the steps per epoch are the trainer's
        self.add_callback(TrainingCurve(self))

    trainer.__init__ = init_with_curve
    module.RecipeManagerTrainerInterface._data_loader_builder = _gradient_samples
    _mend_resuming(trainer)

    from transformers import TrainerCallback

    class _RecipeCountsTrainerSteps(TrainerCallback):
        """Before the first step: the recipe's steps per epoch become the trainer's own, the
        length of its (prepared, per-process) dataloader over the accumulation steps."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            from sparsebert.pipeline.curve import scheduled_optimizer

            optimizer = scheduled_optimizer(self.trainer.optimizer)
            if optimizer is None or train_dataloader is None:
                return
            steps = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)
            self.trainer.manager_steps_per_epoch = steps
            vars(optimizer)["_wrapper"]._wrapped_steps_per_epoch = steps


    class _RecipeResumes(TrainerCallback):
        """Before the first step of a resumed run: the recipe's state as the checkpoint saved it."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            checkpoint = getattr(self.trainer, "_resumed_checkpoint", None)
            if checkpoint is not None:
                _restore_recipe_state(self.trainer, Path(checkpoint))


# Written into every checkpoint after the rest of it: the recipe's position and state.
RECIPE_STATE = "recipe_state.pt"


class RecipeStateMissing(UserError):
    pass


def _mend_resuming(trainer) -> None:
    save_checkpoint, train, get_sampler = trainer._save_checkpoint, trainer.train, trainer._get_train_sampler

    def save_checkpoint_with_recipe(self, model, trial, metrics=None):
        save_checkpoint(self, model, trial, metrics=metrics)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero():
            _save_recipe_state(self, folder)

    def train_resuming_the_recipe(self, *args, **kwargs):
        self._resumed_checkpoint = _resumed_checkpoint(self, kwargs.get("resume_from_checkpoint"))
        return train(self, *args, **kwargs)

    def sampler_seeded_by_epoch(self):
        sampler = get_sampler(self)
        if hasattr(sampler, "generator") and not hasattr(sampler, "set_epoch"):  # LengthGroupedSampler
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # The data loader calls set_epoch before each epoch, a resumed run's first one included.
            sampler.set_epoch = lambda epoch: setattr(sampler, "generator", _generator(seed + epoch))
            sampler.set_epoch(0)
        return sampler

    load_rng_state = trainer._load_rng_state

    def load_rng_state_with_numpy(self, checkpoint):
        import numpy
        import torch

        numpy_state = [numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype, type(numpy.dtype(numpy.uint32))]
        with torch.serialization.safe_globals(numpy_state):
            return load_rng_state(self, checkpoint)

    trainer._save_checkpoint = save_checkpoint_with_recipe
    trainer._load_rng_state = load_rng_state_with_numpy
    trainer.train = train_resuming_the_recipe
    trainer._get_train_sampler = sampler_seeded_by_epoch


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _resumed_checkpoint(trainer, asked) -> str | None:
    """The checkpoint ``train(resume_from_checkpoint=asked)`` resumes (True: the output folder's
    last), refused where it lacks the recipe's state: resumed, the recipe would start again."""
    if not asked:
        return None
    if asked is True:
        from transformers.trainer_utils import get_last_checkpoint

        asked = get_last_checkpoint(trainer.args.output_dir)
        if asked is None:
            return None  # the trainer itself says there is nothing to resume
    if trainer.manager is not None and not (Path(asked) / RECIPE_STATE).is_file():
        raise RecipeStateMissing(
            f"{asked} has no {RECIPE_STATE} (the recipe's state, which the checkpoint was not saved with or was "
            "stopped before it wrote): resumed, the recipe would start again at epoch 0 on a pruned model")
    return str(asked)


def _modifier_state(modifier) -> dict:
    """What a modifier's schedule holds (its plain attributes: whether it started or ended, when it
    last updated, its step counts) and, for a pruning modifier, its masks."""
    state = {"type": type(modifier).__name__,
             "attributes": {name: value for name, value in vars(modifier).items()
                            if name.startswith("_") and (value is None or isinstance(value, (bool, int, float)))}}
    masks = vars(modifier).get("_module_masks")
    if masks is not None:
        state["masks"] = [mask.bool() for mask in masks.param_masks]  # a quarter of the float masks' size
        state["masks_enabled"] = masks.enabled
    return state


def _save_recipe_state(trainer, folder: Path) -> None:
    import torch

    from sparsebert.pipeline.curve import scheduled_optimizer

    state = {"global_step": trainer.state.global_step}
    optimizer = scheduled_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    if trainer.manager is not None and optimizer is not None:
        wrapper = vars(optimizer)["_wrapper"]
        state.update(steps=wrapper._wrapped_steps, epoch=wrapper._wrapped_epoch,
                     modifiers=[_modifier_state(m) for m in trainer.manager.iter_modifiers()])
    partial = folder / f"{RECIPE_STATE}.partial"
    torch.save(state, partial)
    os.replace(partial, folder / RECIPE_STATE)


def _restore_recipe_state(trainer, checkpoint: Path) -> None:
    """The recipe where the checkpoint left it: the optimizer wrapper's step count (from which
    every modifier reads the epoch), each modifier's schedule and the pruning masks."""
    from sparsebert.checkpoint import read_trainer_file
    from sparsebert.pipeline.curve import scheduled_optimizer

    optimizer = scheduled_optimizer(trainer.optimizer)
    if trainer.manager is None or optimizer is None:
        return
    state = read_trainer_file(checkpoint / RECIPE_STATE)
    modifiers = list(trainer.manager.iter_modifiers())
    if [m["type"] for m in state["modifiers"]] != [type(m).__name__ for m in modifiers]:
        raise RecipeStateMissing(f"{checkpoint} was saved with another recipe ({[m['type'] for m in state['modifiers']]}); "
                                 "resume it with the recipe it was trained with")
    wrapper = vars(optimizer)["_wrapper"]
    wrapper._wrapped_steps, wrapper._wrapped_epoch = state["steps"], state["epoch"]
    for modifier, saved in zip(modifiers, state["modifiers"]):
        vars(modifier).update(saved["attributes"])
        if "masks" in saved:
            masks = vars(modifier)["_module_masks"]
            masks.enabled = saved["masks_enabled"]
            masks.set_param_masks([mask.to(held.dtype) for mask, held in zip(saved["masks"], masks.param_masks)])


def _recipe_length(manager) -> float | None:
    """The last epoch any of the recipe's modifiers starts or ends at, not rounded up (what
    SparseML's ``manager.max_epochs`` rounds); None without a recipe or scheduled modifiers."""
    if manager is None:
        return None
    epochs = [epoch for modifier in manager.iter_modifiers()
              for epoch in (modifier.start_epoch, modifier.end_epoch) if epoch > -1]
    return max(epochs) if epochs else None


def _gradient_samples(self, kwargs=None):
    """Endless ``([], inputs, label)`` batches of the training data for OBS's gradient sampler."""
    from torch.utils.data import DataLoader

    if kwargs:
        data = self._remove_unused_columns(self.train_dataset, description="gradient sampling")
        settings = {"batch_size": self.args.per_device_train_batch_size, "shuffle": True, **kwargs}
        loader = DataLoader(data, collate_fn=self.data_collator, **settings)
    else:
        loader = self.get_train_dataloader()
    while True:
        for sample in loader:
            label = sample.pop("labels") if self.label_smoother is not None and "labels" in sample else None
            yield [], self._prepare_inputs(sample), label


def mend_recipe_serialization(module) -> None:
    """A modifier writes its properties into a saved ``recipe.yaml`` with Python's ``str``, so a
    list of ``re:`` patterns became ``['re:bert\\\\.encoder...']``: YAML reads that single-quoted
    text back with doubled backslashes, and the saved recipe's ``params`` matched no parameter
    (the student's own recipe could not say which matrices it pruned). Lists and mappings are
    written as YAML flow collections instead, which read back unchanged."""
    import yaml

    props = module.BaseModifier.props

    def props_as_yaml(self, only_serializable, format_str=False, format_repr=False):
        formatted = props(self, only_serializable, format_str=format_str, format_repr=format_repr)
        if format_str:
            for key, value in props(self, only_serializable).items():
                if key in formatted and isinstance(value, (list, tuple, dict)):
                    try:
                        formatted[key] = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
                    except yaml.YAMLError:  # objects YAML cannot write keep SparseML's own text
                        pass
        return formatted

    module.BaseModifier.props = props_as_yaml


def mend_quantization_scheme(module) -> None:
    """``QuantizationScheme.get_qconfig``/``get_wrapper_qconfig`` tag the ``QConfig`` they make with
    ``qconfig.quantization_scheme = self``, but torch's ``QConfig`` (a namedtuple) has
    ``__slots__`` now, so ``QuantizationModifier`` stopped at once with ``AttributeError: 'QConfig'
    object has no attribute 'quantization_scheme'``: no model could be trained for INT8. The
    QConfig is made as a subclass without ``__slots__``, the same tuple to torch, which takes the tag."""
    global TaggableQConfig
    # No __slots__: instances get a __dict__ for SparseML's tag. Made here, where torch is already
    # imported, and kept as this module's attribute so a quantized model can be pickled.
    TaggableQConfig = type("TaggableQConfig", (module.torch_quantization.QConfig,), {"__module__": __name__})
    make_qconfig = module._get_qconfig
    module._get_qconfig = lambda activation_args, weight_args: TaggableQConfig(
        *make_qconfig(activation_args, weight_args))


def mend_cyclic_learning_rate(module) -> None:
    """``LearningRateFunctionModifier``'s ``cyclic_linear`` counts a cycle in whole steps and
    divides by ``cycle_steps - 1``: when a cycle is not a whole number of steps (0.6 epoch of 32
    steps: 19.2) the rate fell below ``final_lr`` at a cycle's end (1.2e-5 for a 2e-5 floor), it
    went negative for cycles under 2 steps, and a 1-step cycle divided by zero. The rate is now
    read from where the epoch lies in its cycle: ``init_lr`` at each cycle's start, falling
    linearly toward ``final_lr``, never past it."""
    def cyclic_linear(self, epoch: float, steps_per_epoch: int) -> float:
        start = max(self.start_epoch, 0.0)
        cycle = min(self.cycle_epochs, max(self.end_epoch - start, 1e-12))
        position = ((epoch - start + 1e-9) % cycle) / cycle  # 1e-9: a restart's epoch, rounded, is no cycle's end
        return self.init_lr - position * (self.init_lr - self.final_lr)

    module.LearningRateFunctionModifier._cyclic_linear = cyclic_linear


def mend_mask_threshold(module) -> None:
    """Gradual magnitude pruning finds each matrix's threshold at every mask update with
    ``memory_aware_threshold``, which sorts the whole matrix (``torch.sort``) to read one element
    unless ``MEMORY_BOUNDED`` is set. On a CPU that sort took 36.5 s of a 100 s SST-2 student's
    training loop (77 mask updates of 36 matrices; cProfile, AMD EPYC, 2 cores).
    ``torch.kthvalue`` selects the same element, so the same masks, 6-15x faster on these
    matrices (147k weights: 11.8 ms -> 1.9; 590k: 48.8 -> 3.4). CUDA tensors keep the sort."""
    import torch

    sort_threshold = module.memory_aware_threshold

    def select_threshold(tensor, idx):
        if tensor.is_cuda:
            return sort_threshold(tensor, idx)
        return torch.kthvalue(tensor.reshape(-1), idx + 1)[0]

    module.memory_aware_threshold = select_threshold


# Families whose SparseML attention rewrite was checked to keep an FP32 model's logits (tests).
# Not DistilBERT (its rewrite calls the QATMatMul class, not an instance: TypeError) nor
# MobileBERT (it replaces a trained linear with a new, random one).
QUANTIZABLE_ATTENTION_FAMILIES = ("bert",)


def mend_quantizable_attention(module) -> None:
    """SparseML rewrites a model's self-attention so that its two matmuls (query x key, and
    probabilities x value) can be quantized, but it looks the rewrite up by the top module's class
    and registers it for the base model only (``BertModel``): a ``BertForSequenceClassification``
    was never rewritten, so INT8 training quantized the linears and left every attention matmul in
    FP32. The sequence classifier of each family in ``QUANTIZABLE_ATTENTION_FAMILIES`` now gets its
    base model's rewrite (the same forward, no new weights: an FP32 model's logits are unchanged)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, \
        MODEL_MAPPING_NAMES

    from sparseml.modifiers.quantization_legacy.modification.registry import ModificationRegistry

    registered = set(ModificationRegistry.registered_names()) | set(ModificationRegistry.registered_aliases())
    for family in QUANTIZABLE_ATTENTION_FAMILIES:
        base, head = MODEL_MAPPING_NAMES[family], MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[family]
        if base.lower() in registered and head.lower() not in registered:
            ModificationRegistry.register_value(ModificationRegistry.get_value_from_registry(base), name=head)


def quantizable(model):
    """``model`` with SparseML's quantizable self-attention where its family has one (see
    ``mend_quantizable_attention``), as SparseML's loaders give it to training."""
    import sparseml.transformers.sparsification.modification  # noqa: F401  (registers, then mended)
    from sparseml.modifiers.quantization_legacy.modification import modify_model

    return modify_model(model)


def mend_task_model_loading(module) -> None:
    """``sparseml.export`` (and its console script) load a text-classification checkpoint with
    ``SparseAutoModel.text_classification_from_pretrained``, which never applies the recipe saved
    beside it and looks for QAT state only in ``pytorch_model.bin``: a quantization-aware
    checkpoint in safetensors loaded as a plain BERT, its quantized linears left at random values,
    without an error (the exported "INT8" model was a dense FP32 one, 0% sparse). Such a
    checkpoint is now loaded by ``sparsebert.inference.load_classifier``, which rebuilds the
    recipe's structure, loads every tensor strictly and refuses one it cannot place."""
    load_task_model = module.load_task_model

    def load_quantized_too(task, model_path, config, recipe=None, trust_remote_code=False, **kwargs):
        from sparsebert import checkpoint, inference

        if task in module.TaskNames.text_classification.value and recipe is None and \
                (Path(str(model_path)) / "config.json").is_file() and checkpoint.is_quantized(Path(str(model_path))):
            return inference.load_classifier(Path(str(model_path)))
        return load_task_model(task, model_path, config, recipe=recipe, trust_remote_code=trust_remote_code, **kwargs)

    module.load_task_model = load_quantized_too


def __getattr__(name: str):
    """``TaggableQConfig`` for pickle in a process that has not imported SparseML's quantization."""
    if name == "TaggableQConfig":
        import sparseml.pytorch.sparsification.quantization.quantization_scheme  # noqa: F401  (runs the mend)

        return globals()[name]
    raise AttributeError(name)


def register_modifiers(module) -> None:
    """SparseML has no plug-in mechanism for recipe modifiers: importing the project's module
    registers ``!SparseBertDistillationModifier`` with its YAML loader."""
    import importlib

    importlib.import_module("sparsebert.pipeline.modifiers")


# ---------------------------------------------------------------- DeepSparse


def mend_deepsparse_text_classification(module) -> None:
    """DeepSparse's ``TextClassificationPipeline.process_engine_outputs`` applies a sigmoid
    whenever the model has one output, so a regression model (STS-B) answered a squashed 0-1
    "probability" instead of its prediction on the task's own 0-5 scale. A regression model
    (``sparsebert.inference.is_regression``) now answers its raw output as the score, with
    ``id2label[0]`` as the label; classification keeps DeepSparse's softmax/sigmoid."""
    pipeline = module.TextClassificationPipeline
    process = pipeline.process_engine_outputs

    def process_with_regression(self, engine_outputs):
        from sparsebert.inference import is_regression

        if not is_regression(self.config):
            return process(self, engine_outputs)
        import numpy

        outputs = engine_outputs[0] if isinstance(engine_outputs, list) else engine_outputs
        values = numpy.asarray(outputs).reshape(len(outputs), -1)[:, 0].tolist()  # one per input
        label = self.config.id2label[0]
        if self.top_k == 1:
            return self.output_schema(labels=[label] * len(values), scores=values)
        return self.output_schema(labels=[[label] for _ in values], scores=[[value] for value in values])

    pipeline.process_engine_outputs = process_with_regression


# SparseML/DeepSparse module -> what runs right after it is imported.
AFTER_IMPORT = {
    "deepsparse.transformers.pipelines.text_classification": mend_deepsparse_text_classification,
    "sparseml.optim.modifier": mend_recipe_serialization,
    "sparseml.pytorch.optim.optimizer": mend_scheduled_optimizer,
    "sparseml.pytorch.sparsification": register_modifiers,
    "sparseml.pytorch.sparsification.pruning.mask_creator": mend_mask_threshold,
    "sparseml.pytorch.sparsification.quantization.quantization_scheme": mend_quantization_scheme,
    "sparseml.pytorch.sparsification.training.modifier_lr": mend_cyclic_learning_rate,
    "sparseml.transformers.sparsification.modification": mend_quantizable_attention,
    "sparseml.transformers.text_classification": mend_text_classification,
    "sparseml.transformers.utils.load_task_model": mend_task_model_loading,
    "sparseml.transformers.sparsification.trainer": mend_trainer,
}


# ---------------------------------------------------------------- liveness

_MENDED = "_sparsebert_mended"


class MendsNotLive(UserError):
    """SparseML or DeepSparse was loaded without the mends above."""


def mend(module) -> None:
    """Run ``module``'s mend (``module`` is one of ``AFTER_IMPORT``) once, and mark it mended."""
    if not getattr(module, _MENDED, False):
        AFTER_IMPORT[module.__name__](module)
        setattr(module, _MENDED, True)


def unmended() -> list[str]:
    """The modules of ``AFTER_IMPORT`` loaded in this process without their mend."""
    return [name for name in AFTER_IMPORT
            if name in sys.modules and not getattr(sys.modules[name], _MENDED, False)]


def require() -> None:
    """Refuse to go on with an unmended stack: unmended, SparseML's optimizer wrapper trains at a
    learning rate of 0 and nothing says so."""
    missing = unmended()
    if missing:
        raise MendsNotLive(
            f"SparseML/DeepSparse was loaded without sparsebert's mends ({', '.join(missing)}); it would "
            f"train at learning rate 0: import sparsebert before sparseml (or call "
            f"sparsebert.sparseml_mends.apply()), or install sparsebert with pip so its start-up hook runs")


def apply() -> None:
    """Make the mends live in this process, explicitly: every entry point the project owns calls
    this before anything imports SparseML or DeepSparse (the ``.pth`` start-up hook does the
    same for SparseML's own console scripts). A module already loaded unmended is refused, not
    patched late: other modules may hold its functions from before."""
    from sparsebert import _startup

    _startup.install()
    require()
