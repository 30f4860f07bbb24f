"""The training rules, next to what they rule: a ``TrainRequest`` (what `sparsebert train` asks
for, one field per flag) is checked and turned into the stage's options and configs here, so a
Python caller (the sweep included) meets the same refusals as the CLI, and ``stage.run`` refuses
configs that break them (``check_stage``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from sparsebert import glue
from sparsebert.errors import UserError
from sparsebert.models import DEFAULT_MODEL
from sparsebert.pipeline.train import TrainConfig


class TrainingRefused(UserError):
    pass


# The student's learning rate when none is given. docs/study/study.md: at 90%, STS-B 29.31 at 1e-4
# against 60.31 +- 5.56 at 3e-4 (two seeds), SST-2 +1.0 (two seeds each).
STUDENT_LR = 3e-4


# A task's own default schedule, where the study found one better than the recipe's. STS-B: the
# student distils on the originals plus 4 teacher-labelled variants of each pair, for 3 epochs,
# pruned over the first 40% of them. At 90% it kept 87.2% of its teacher over two seeds (71.82
# and 70.83) where the recipe's 10 epochs of the originals kept 71.6% (58.50): those students fit
# their 5,749 training pairs and did not generalise. On MRPC the same schedule did not help at 90%
# (F1 76.37 against 79.16, both under the all-"equivalent" guess; docs/study/study.md, fifth
# session; one seed), so MRPC and the rest keep the recipe's. The new schedule takes 1.5x the
# optimizer steps of the recipe's. Giving --augment (0: none), --student-epochs, a
# SCHEDULE_VARIABLES entry in --recipe-args, --student-layers or a recipe other than the default
# by name sets the schedule yourself (wholly: nothing of this one is kept).
# At 95% it did not help (17.39 against 19.25, one seed: 0.53 M weights are short of capacity,
# not of data), so it applies up to TASK_SCHEDULE_MAX_SPARSITY; below 90% it is not measured (the
# recipe's 80% student shows the same gap: training MSE 0.09, dev 74.85).
TASK_SCHEDULES = {"stsb": {"augment": 4, "student_epochs": 3.0, "prune_end_fraction": 0.4}}
TASK_SCHEDULE_MAX_SPARSITY = 0.9
# Recipe variables that set the schedule: any of them given is a schedule of the user's own.
SCHEDULE_VARIABLES = ("num_epochs", "init_sparsity", "prune_start_fraction", "prune_end_fraction", "mask_updates")
DEFAULT_RECIPE = "sparsebert"


@dataclass(frozen=True)
class TrainRequest:
    """One `sparsebert train`, as Python; each field is the flag of the same name (``None``: the
    recipe's own value, or the stage's default)."""

    task: str
    out: Path | None = None  # default runs/<task>
    glue_dir: str | None = field(default_factory=lambda: os.environ.get("GLUE_DIR"))
    model: str = DEFAULT_MODEL
    teacher: str | None = None
    sparsity: float | None = None
    teacher_epochs: float = 3.0
    teacher_lr: float = 5e-5
    student_epochs: float | None = None
    student_lr: float | None = None  # None: STUDENT_LR (or a recipe's own learning_rate)
    batch_size: int = 32
    max_seq_length: int = 128
    recipe: str = DEFAULT_RECIPE
    recipe_args: dict = field(default_factory=dict)
    precision: str = "auto"
    augment: int | None = None
    student_init: str = "pretrained"
    student_layers: int | None = None
    int8: bool = False
    int8_epochs: float | None = None
    int8_lr: float = 2e-5
    int8_recipe_args: dict = field(default_factory=dict)
    augment_cache: Path | None = None
    limit: int | None = None
    teacher_limit: int | None = None
    seed: int = 42
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int | None = None  # None: about 10 checkpoints a stage, at least MIN_CHECKPOINT_STEPS apart

    @classmethod
    def default(cls, name: str):
        """A field's default (the CLI's flag defaults read these)."""
        spec = next(f for f in fields(cls) if f.name == name)
        return spec.default_factory() if callable(spec.default_factory) else spec.default


def check(request: TrainRequest) -> TrainRequest:
    """Everything that can be checked before a model is loaded or a step is taken; returns the
    request with its run folder resolved."""
    task = glue.get_task(request.task)
    if request.sparsity is not None and not 0 <= request.sparsity < 1:
        raise TrainingRefused(f"--sparsity must be in [0, 1), got {request.sparsity}")
    for name in ("teacher_epochs", "student_epochs", "teacher_lr", "student_lr", "int8_epochs", "int8_lr"):
        if getattr(request, name) is not None and getattr(request, name) <= 0:
            raise TrainingRefused(f"--{name.replace('_', '-')} must be positive")
    if request.int8_epochs is not None and not request.int8:
        raise TrainingRefused("--int8-epochs needs --int8")
    if request.int8_recipe_args and not request.int8:
        raise TrainingRefused("--int8-recipe-args needs --int8")
    if request.augment_cache is not None and not (request.augment or task_schedule(request)):
        raise TrainingRefused("--augment-cache needs --augment N")
    request = replace(request, out=Path(request.out or Path("runs") / task.name))
    check_options(request)
    return request


def check_options(opts) -> None:
    """The rules on what a stage is given (a ``TrainRequest`` or ``stage.StageOptions``)."""
    if opts.glue_dir is not None and not Path(opts.glue_dir).is_dir():
        raise TrainingRefused(f"GLUE directory not found: {opts.glue_dir}")
    if opts.teacher and not (Path(opts.teacher) / "config.json").is_file():
        raise TrainingRefused(f"--teacher {opts.teacher} is not a model folder (no config.json)")
    if opts.augment is not None and opts.augment < 0:
        raise TrainingRefused(f"--augment must be 0 (none) or more, not {opts.augment}")
    if opts.student_layers is not None and opts.student_layers < 1:
        raise TrainingRefused(f"--student-layers must be at least 1, not {opts.student_layers}")
    if opts.student_layers is not None and opts.student_init == "teacher":
        raise TrainingRefused("--student-layers keeps the first layers of the pre-trained model; it does not go "
                              "with --student-init teacher")
    if opts.limit is not None and opts.limit < 1:
        raise TrainingRefused(f"--limit must be at least 1 example, not {opts.limit}")
    if opts.teacher_limit is not None and opts.teacher_limit < 1:
        raise TrainingRefused(f"--teacher-limit must be at least 1 example, not {opts.teacher_limit}")
    if opts.teacher_limit is not None and opts.teacher:
        raise TrainingRefused("--teacher-limit sets what a new teacher trains on; a reused --teacher is not trained")
    refuse_inputs_inside_out(opts)
    if opts.teacher:
        from sparsebert.pipeline.train import check_teacher_labels

        check_teacher_labels(Path(opts.teacher), glue.get_task(opts.task))


def refuse_inputs_inside_out(opts) -> None:
    """What the run reads must not lie in the run folder it replaces: a --teacher or --model
    there would be read from the earlier run while the new one is built, then deleted with it
    (and metrics.json would name it), and an --augment-cache there would be written into it."""
    from sparsebert import atomic

    out = atomic.destination(opts.out).resolve()  # refuses a mount point, or the folder one works in
    inputs = [("--teacher", opts.teacher), ("--augment-cache", opts.augment_cache)]
    if opts.model and Path(opts.model).exists():  # a folder, not a hub name
        inputs.append(("--model", opts.model))
    for flag, given in inputs:
        if given and (Path(given).resolve() == out or out in Path(given).resolve().parents):
            raise TrainingRefused(f"{flag} {given} is inside --out {opts.out}, which this run replaces; "
                                  "copy it elsewhere or choose another --out")


def schedule(recipe: Path, recipe_args: dict, flags: list[tuple] = ()) -> tuple[dict, float]:
    """One source of truth for a recipe's sparsity and length of training.

    ``--sparsity`` and ``--student-epochs`` are the recipe variables ``final_sparsity`` and
    ``num_epochs`` given another way: each is passed only when given (so a recipe's own values
    take effect), and a flag that disagrees with ``--recipe-args`` is refused rather than
    silently overridden. The epochs returned are the ones SparseML's trainer runs: the recipe's
    own, its last modifier's end (SparseML rounded it up to whole epochs; sparseml_mends keeps
    the fraction).
    """
    from sparsebert.recipe import check_recipe, recipe_variables

    recipe_args = dict(recipe_args)
    declared = recipe_variables(recipe)
    for name, value in recipe_args.items():  # YAML's true/false given as "false" would be truthy
        if isinstance(declared.get(name), bool) and not isinstance(value, bool):
            raise TrainingRefused(f"--recipe-args {name} must be true or false (JSON), not {value!r}")
    for flag, variable, value in flags:
        if value is None:
            continue
        if variable not in declared:
            raise TrainingRefused(f"{flag} needs the recipe variable {variable}, which {recipe} does not declare")
        if variable in recipe_args and recipe_args[variable] != value:
            raise TrainingRefused(f"{flag} {value} disagrees with --recipe-args {variable}={recipe_args[variable]}; give one")
        recipe_args[variable] = value
    modifiers = check_recipe(recipe, recipe_args)
    # The trainer runs to the last modifier's end (mended: SparseML rounded it up to whole epochs).
    epochs = max((m.end_epoch for m in modifiers if getattr(m, "end_epoch", -1) > 0), default=None)
    if epochs is None:
        raise TrainingRefused(f"{recipe} never ends: no modifier has an end_epoch")
    return recipe_args, float(epochs)


def check_config(cfg: TrainConfig, what: str) -> None:
    """A config ``stage.run`` can honour: positive epochs and rate, and, with a recipe, the
    recipe's own length (SparseML trains for it whatever ``epochs`` says) and a sparsity below 1."""
    if cfg.epochs <= 0 or cfg.learning_rate <= 0:
        raise TrainingRefused(f"the {what}'s epochs and learning rate must be positive, got {cfg.epochs} and "
                              f"{cfg.learning_rate}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        raise TrainingRefused(f"--checkpoint-every must be at least 1 step, not {cfg.checkpoint_every}")
    if cfg.recipe:
        sparsity = cfg.recipe_args.get("final_sparsity")
        if sparsity is not None and not 0 <= sparsity < 1:
            raise TrainingRefused(f"the {what}'s final_sparsity must be in [0, 1), got {sparsity}")
        _, epochs = schedule(Path(cfg.recipe), cfg.recipe_args)
        if epochs != cfg.epochs:
            raise TrainingRefused(f"the {what} config says {cfg.epochs} epochs but its recipe runs {epochs}: "
                                  "set the recipe's num_epochs (request.schedule does)")


def check_stage(opts, teacher_cfg: TrainConfig, student_cfg: TrainConfig, int8_cfg: TrainConfig | None) -> None:
    """What ``stage.run`` refuses: the same rules as the CLI's, on the options and configs."""
    glue.get_task(opts.task)
    check_options(opts)
    for cfg, what in ((teacher_cfg, "teacher"), (student_cfg, "student"), (int8_cfg, "INT8 student")):
        if cfg is not None:
            check_config(cfg, what)


def task_schedule(request: TrainRequest) -> dict:
    """The task's own schedule (TASK_SCHEDULES) when it is the request's default, else {}."""
    own = (request.augment is not None or request.student_epochs is not None or request.recipe != DEFAULT_RECIPE
           or set(request.recipe_args) & set(SCHEDULE_VARIABLES) or request.student_layers is not None)
    if own or glue.get_task(request.task).name not in TASK_SCHEDULES:
        return {}
    from sparsebert.recipe import recipe_path, recipe_variables

    sparsity = request.sparsity if request.sparsity is not None else request.recipe_args.get(
        "final_sparsity", recipe_variables(recipe_path(request.recipe))["final_sparsity"])
    return dict(TASK_SCHEDULES[glue.get_task(request.task).name]) if sparsity <= TASK_SCHEDULE_MAX_SPARSITY + 1e-9 else {}


def with_default_schedule(request: TrainRequest) -> TrainRequest:
    """The request with its task's default schedule filled in; any other request as it is."""
    auto = task_schedule(request)
    if not auto:
        return request
    print(f"[sparsebert] {request.task}'s default schedule: the student distils on its training set plus "
          f"{auto['augment']} teacher-labelled variants of each example, {auto['student_epochs']:g} epochs, "
          f"pruned over the first {auto['prune_end_fraction']:.0%} (--augment 0 or --student-epochs N: the "
          "recipe's own schedule)", flush=True)
    return replace(request, augment=auto["augment"], student_epochs=auto["student_epochs"],
                   recipe_args={**request.recipe_args, "prune_end_fraction": auto["prune_end_fraction"]})


def plan(request: TrainRequest):
    """The stage's options and the teacher's, student's and INT8 student's configs for a checked
    request (the student's epochs reconciled with its recipe; the task's default schedule
    filled in)."""
    from sparsebert import models
    from sparsebert.hardware import resolve_precision
    from sparsebert.pipeline.stage import StageOptions
    from sparsebert.recipe import recipe_path, recipe_variables

    original, request = request, with_default_schedule(request)
    model = models.resolve_model(request.model)
    if request.student_layers:  # refused before the teacher's minutes are spent
        from transformers import AutoConfig

        depth = AutoConfig.from_pretrained(model).num_hidden_layers
        if request.student_layers > depth:
            raise TrainingRefused(f"--student-layers {request.student_layers}: {request.model} has only {depth} layers")
    recipe = recipe_path(request.recipe)
    # A recipe that sets the learning rate itself (sparsebert-cyclic) gets --student-lr; given
    # only in --recipe-args it is that, and the two given differently are refused.
    student_lr = request.student_lr if request.student_lr is not None else STUDENT_LR
    rate = []
    if "learning_rate" in recipe_variables(recipe) and (request.student_lr is not None
                                                         or "learning_rate" not in request.recipe_args):
        rate = [("--student-lr", "learning_rate", student_lr)]
    recipe_args, epochs = schedule(recipe, request.recipe_args,
                                   [("--sparsity", "final_sparsity", request.sparsity),
                                    ("--student-epochs", "num_epochs", request.student_epochs), *rate])
    common = dict(batch_size=request.batch_size, max_seq_length=request.max_seq_length, seed=request.seed,
                  precision=resolve_precision(request.precision), checkpoint_every=request.checkpoint_every)
    teacher_cfg = TrainConfig(epochs=request.teacher_epochs, learning_rate=request.teacher_lr, **common)
    student_cfg = TrainConfig(epochs=epochs, learning_rate=recipe_args.get("learning_rate", student_lr),
                              recipe=str(recipe), recipe_args=recipe_args, **common)
    int8_cfg = None
    if request.int8:
        int8_recipe = recipe_path("sparsebert-int8")
        # The same distillation as the student's: its loss variables carry over (num_epochs does not).
        shared = {k: v for k, v in recipe_args.items() if k in recipe_variables(int8_recipe) and k != "num_epochs"}
        int8_args, int8_epochs = schedule(int8_recipe, {**shared, **request.int8_recipe_args},
                                          [("--int8-epochs", "num_epochs", request.int8_epochs)])
        int8_cfg = TrainConfig(epochs=int8_epochs, learning_rate=request.int8_lr, recipe=str(int8_recipe),
                               recipe_args=int8_args, **common)
    opts = StageOptions(task=request.task, model=model, out=request.out, glue_dir=request.glue_dir,
                        teacher=request.teacher, limit=request.limit, teacher_limit=request.teacher_limit,
                        overwrite=request.overwrite, resume=request.resume,
                        model_name=request.model, augment=request.augment, augment_cache=request.augment_cache,
                        student_init=request.student_init, student_layers=request.student_layers,
                        task_schedule=task_schedule(original) or None)
    return opts, teacher_cfg, student_cfg, int8_cfg


def train(request: TrainRequest) -> dict:
    """Check, plan and run one training request; returns its metrics (also in <out>/metrics.json).
    An existing run folder is replaced only with ``overwrite``, and only once the new run is whole
    (``stage.run`` builds it beside the earlier one)."""
    from sparsebert.pipeline import stage

    request = check(request)
    return stage.run(*plan(request))
