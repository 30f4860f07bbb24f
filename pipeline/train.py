"""Teacher fine-tuning and SparseBERT student training, both through SparseML's own
text-classification script (``sparseml.transformers.text_classification.main``), so that the
CLI and the documented console entry point run exactly the same code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sparsebert import families, glue, hardware, sparseml_mends
from sparsebert.errors import UserError
from sparsebert.pipeline import distributed
from sparsebert.recipe import recipe_path


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (teacher or student)."""

    epochs: float
    learning_rate: float
    batch_size: int = 32
    max_seq_length: int = 128
    warmup_ratio: float = 0.1
    seed: int = 42
    precision: str = "fp32"  # "fp32" or "bf16" (autocast); resolved from "auto" by the CLI
    recipe: str | None = None
    recipe_args: dict = field(default_factory=dict)
    checkpoint_every: int | None = None  # steps between the checkpoints a stopped run resumes from (None: default_checkpoint_steps)


# About this many points on every training curve.
CURVE_POINTS = 50
# About this many checkpoints per stage, but not closer than this many steps: each costs a second or
# two (weights, optimizer moments, masks), and a short stage loses little when it starts again.
CHECKPOINTS = 10
MIN_CHECKPOINT_STEPS = 50


def default_checkpoint_steps(total_steps: int) -> int:
    return max(MIN_CHECKPOINT_STEPS, total_steps // CHECKPOINTS)


def sparseml_arguments(model: str, data: dict, output_dir: Path, cfg: TrainConfig,
                       teacher: str | None = None) -> dict:
    """Keyword arguments for SparseML's ``text_classification.main`` (its CLI flags)."""
    args = {
        "model_name_or_path": model,
        "train_file": data["splits"]["train"]["path"],
        "validation_file": data["splits"][glue.dev_splits(glue.get_task(data["task"]))[0]]["path"],
        "input_column_names": ",".join(data["text_columns"]),
        "label_column_name": "label",
        "max_seq_length": cfg.max_seq_length,
        # Dynamic padding (per batch) over length-grouped batches: short GLUE sentences are not
        # padded to max_seq_length, and batches of similar lengths waste little on padding.
        "pad_to_max_length": False,
        "group_by_length": True,
        "output_dir": str(output_dir),
        # The stage itself refuses to reuse a run folder it did not clear (stage.claim).
        "overwrite_output_dir": True,
        "do_train": True,
        "do_eval": False,
        # The global batch: split over the processes of a torchrun run (pipeline.distributed).
        "per_device_train_batch_size": distributed.per_rank_batch(cfg.batch_size),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "warmup_ratio": cfg.warmup_ratio,
        "lr_scheduler_type": "linear",
        "logging_strategy": "steps",
        "logging_steps": _logging_steps(data["splits"]["train"]["examples"], cfg),
        "bf16": cfg.precision == "bf16",
        # Checkpoints to resume from; the two newest are kept (one may be cut short by a kill),
        # and all are removed once the stage has finished.
        "save_strategy": "steps",
        "save_steps": cfg.checkpoint_every or default_checkpoint_steps(_total_steps(data["splits"]["train"]["examples"], cfg)),
        "save_total_limit": 2,
        "evaluation_strategy": "no",
        "report_to": "none",
        "seed": cfg.seed,
        "disable_tqdm": False,
    }
    if distributed.active() and not _has_gpu():
        args["use_cpu"] = True  # how the Trainer (accelerate) runs DDP on CPUs (gloo); else it trains alone
    if cfg.recipe:
        args["recipe"] = cfg.recipe
        # cfg.epochs is the recipe's own length (request.schedule; stage.run refuses others), so the
        # Trainer and the recipe's schedule agree; SparseML also takes the recipe's over ours.
        args["recipe_args"] = json.dumps(cfg.recipe_args)
    if teacher:
        args["distill_teacher"] = teacher
    return args


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _total_steps(train_examples: int, cfg: TrainConfig) -> int:
    return int(math.ceil(train_examples / cfg.batch_size) * cfg.epochs)


def _logging_steps(train_examples: int, cfg: TrainConfig) -> int:
    return max(1, _total_steps(train_examples, cfg) // CURVE_POINTS)


def run_sparseml(arguments: dict) -> None:
    """Run SparseML's text-classification script in this process (under torchrun, on every
    process: rank 0 sends the others the same arguments first)."""
    distributed.send_stage(arguments)
    train_here(arguments)
    distributed.stage_done()


def train_here(arguments: dict) -> None:
    """SparseML's text-classification script on ``arguments``, in this process."""
    # Offline, the script's hub metric load is mended by sparsebert._startup; the official
    # GLUE metrics are computed afterwards by sparsebert.glue.
    import torch
    from sparseml.transformers import text_classification

    sparseml_mends.require()  # a Python caller whose SparseML loaded unmended would train at LR 0

    if not os.environ.get("OMP_NUM_THREADS"):  # an explicit choice (several runs at once) wins
        torch.set_num_threads(hardware.physical_cores())
    text_classification.main(**arguments)


def finished(output_dir: Path) -> bool:
    """Whether a training stage wrote its final model into ``output_dir``: SparseML's script saves
    the model, then the trainer's state (``trainer_state.json``, checked here)."""
    return (Path(output_dir) / "trainer_state.json").is_file()


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest whole checkpoint a stopped stage left in ``output_dir`` (the recipe's state is
    written last), or None."""
    whole = [c for c in Path(output_dir).glob("checkpoint-*")
             if c.name.split("-")[-1].isdigit() and (c / sparseml_mends.RECIPE_STATE).is_file()]
    return max(whole, key=lambda c: int(c.name.split("-")[-1]), default=None)


def run_stage(arguments: dict, what: str) -> None:
    """One training stage in ``arguments["output_dir"]``: resumed from the checkpoint a stopped run
    left there, skipped where that run finished it; its checkpoints removed once it finishes."""
    output_dir = Path(arguments["output_dir"])
    if finished(output_dir):
        print(f"[sparsebert] resuming: the {what} in {output_dir} had finished; kept as it is", flush=True)
    else:
        resumed = resumable_checkpoint(output_dir)
        if resumed is not None:
            print(f"[sparsebert] resuming the {what} from {resumed}", flush=True)
        run_sparseml({**arguments, "resume_from_checkpoint": str(resumed) if resumed else None})
    # Also where a run was stopped after the stage finished but before they were removed.
    for folder in output_dir.glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)


def student_label_order(task: glue.GlueTask) -> list[str] | None:
    """The order of the label ids SparseML's script gives a model it trains from our files (no
    task name): the label names sorted. A teacher's logits are distilled id by id, so a reused
    teacher must have the same order."""
    return sorted(task.labels) if task.labels else None


def check_teacher_labels(teacher: Path, task: glue.GlueTask) -> None:
    """Refuse a ``--teacher`` whose outputs do not mean what the student's do."""
    from sparsebert.errors import UserError

    try:
        config = json.loads((Path(teacher) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--teacher {teacher}: cannot read its config.json ({error})") from None
    labels = [str(v) for _, v in sorted((int(k), v) for k, v in (config.get("id2label") or {}).items())]
    if task.is_regression:
        if len(labels) != 1:
            raise UserError(f"--teacher {teacher} has {len(labels)} outputs; {task.name} is a regression "
                            "task and needs a teacher with one")
        return
    expected = student_label_order(task)
    if labels != expected:
        raise UserError(f"--teacher {teacher} orders its labels {labels}, the student {expected}: its "
                        "logits would be distilled into the wrong labels; fine-tune it with `sparsebert train`")


def first_layers(model: str, layers: int, output_dir: Path) -> Path:
    """A copy of ``model`` (folder or hub name) that keeps only its embeddings and first ``layers``
    encoder layers: the small dense student of the sparse-vs-small comparison, as wide as the
    teacher. Its task head, if any, is left out and trained anew."""
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(model)
    encoder_layers = families.encoder_layers(base)
    if not 1 <= layers <= len(encoder_layers):
        raise ValueError(f"cannot keep {layers} of {len(encoder_layers)} layers")
    del encoder_layers[layers:]
    # DistilBERT counts its layers in n_layers (num_hidden_layers is an alias of it).
    base.config.num_hidden_layers = layers
    base.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(model).save_pretrained(output_dir)
    return output_dir


def train_teacher(model: str, data: dict, output_dir: Path, cfg: TrainConfig) -> Path:
    """Fine-tune the dense model on the task (no recipe: nothing is pruned)."""
    run_stage(sparseml_arguments(model, data, output_dir, cfg), "teacher")
    return output_dir


class RecipeDoesNotFit(UserError):
    pass


def fitted_recipe(model: str, recipe: str) -> tuple[families.Family, str]:
    """``model``'s family and the text of ``recipe`` for it: the shipped recipes name BERT's
    linears, so for another family their pruned-params blocks (where not edited by hand) are
    written with its names. Refuses an unknown family, and a recipe (one of the user's own) whose
    params name no weight of the model (SparseML would stop with a traceback once the student
    starts, after the teacher)."""
    import torch
    from sparseml.pytorch.utils import any_str_or_regex_matches_param_name
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sparsebert.recipe import pruned_params_of_text
    from sparsebert.recipes import build

    family = families.of_model(model)
    text = build.for_family(Path(recipe).read_text(), family)
    with torch.device("meta"):  # the names only: no weights read or allocated
        names = [n for n, _ in AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(model)).named_parameters()]
    for pattern in pruned_params_of_text(text):
        if not any(any_str_or_regex_matches_param_name(name, [pattern]) for name in names):
            raise RecipeDoesNotFit(f"{recipe}: the pruned param {pattern} names no weight of the {family.name} "
                                   f"model {model}; its six linears a layer are {' '.join(family.pruned_params())}")
    return family, text


def recipe_for(model: str, recipe: str, output_dir: Path) -> str:
    """``recipe`` as ``fitted_recipe`` fits it to ``model``: itself where nothing changes, else a
    copy beside ``output_dir``."""
    family, text = fitted_recipe(model, recipe)
    if text == Path(recipe).read_text():
        return recipe
    path = Path(output_dir).parent / f"{Path(output_dir).name}-{family.prefix}-{Path(recipe).name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def train_student(model: str, teacher: Path, data: dict, output_dir: Path, cfg: TrainConfig) -> Path:
    """Prune the *pre-trained* model while distilling it from the fine-tuned teacher."""
    cfg.recipe = recipe_for(model, cfg.recipe or str(recipe_path("sparsebert")), output_dir)
    run_stage(sparseml_arguments(model, data, output_dir, cfg, teacher=str(teacher)), "student")
    return output_dir


def train_int8(student: Path, teacher: Path, data: dict, output_dir: Path, cfg: TrainConfig) -> Path:
    """Quantization-aware training of the pruned student (its zeros held), distilled from the
    same teacher: the INT8 student. FP32 only: fake quantization emulates the INT8 engines, and
    bf16 autocast would round the linears' inputs before the emulation does."""
    cfg.recipe = recipe_for(str(student), cfg.recipe or str(recipe_path("sparsebert-int8")), output_dir)
    cfg.precision = "fp32"
    run_stage(sparseml_arguments(str(student), data, output_dir, cfg, teacher=str(teacher)), "INT8 student")
    return output_dir
