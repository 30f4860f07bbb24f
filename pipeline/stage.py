"""The whole training stage in one run folder (``sparsebert.runfolder``):

    <run>/data/        train.json, dev.json (label names kept), data.json
    <run>/teacher/     fine-tuned dense model (SparseML/HF checkpoint), curve.{json,png}
    <run>/student/     pruned, distilled model + recipe.yaml, curve.{json,png}
    <run>/student-int8/ (--int8) the student after quantization-aware training, zeros held
    <run>/metrics.json dense and sparse dev metrics beside the majority baseline, measured
                       sparsity, parameters, FLOPs
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsebert import atomic, checkpoint, flops, glue, hardware, sparseml_mends
from sparsebert.errors import UserError
from sparsebert.runfolder import RunFolder
from sparsebert.pipeline import curve
from sparsebert.pipeline import data as data_stage
from sparsebert.pipeline import report
from sparsebert.pipeline.train import TrainConfig, first_layers, fitted_recipe, train_int8, train_student, train_teacher
from sparsebert.recipe import recipe_path
from sparsebert.runfolder import INT8


@dataclass
class StageOptions:
    task: str
    model: str  # a folder or hub name that from_pretrained accepts
    out: Path
    glue_dir: str | None
    teacher: str | None = None  # an already fine-tuned teacher to reuse
    limit: int | None = None
    teacher_limit: int | None = None  # the teacher fine-tunes on a subset; the student distils on all
    overwrite: bool = False
    model_name: str | None = None  # what the user called it (e.g. all-MiniLM-L6-v2)
    augment: int | None = None  # teacher-labelled variants per training example for the student
    augment_cache: Path | None = None  # where augmented data is kept (default: the run's data/)
    student_init: str = "pretrained"  # "teacher": fine-tune-then-prune, the order the paper argues against
    student_layers: int | None = None  # keep only the first K layers: a small dense student
    task_schedule: dict | None = None  # the task's own default schedule, when it was applied (request.TASK_SCHEDULES)
    resume: bool = False  # go on with the run a stopped `sparsebert train` left beside ``out``


def describe(task: glue.GlueTask, model_dir: Path, dev_sets: dict, seq_len: int, patterns: list[str],
             pretrained: dict | None) -> dict:
    """Dev metrics, measured sparsity (on the recipe's pruned matrices), parameter counts,
    FLOPs of one saved checkpoint, and how many of its kept weights training moved."""
    weights = checkpoint.load_weights(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    moved = report.kept_weights_moved(weights, pretrained, patterns) if pretrained else None
    return {
        "path": str(model_dir),
        "dev": report.evaluate(task, model_dir, dev_sets, seq_len),
        **checkpoint.sparsity_report(weights, patterns),
        "kept_weights_moved": moved,
        "flops": flops.encoder_flops(weights, patterns, seq_len, config),
    }


def write_curve(model_dir: Path, title: str) -> dict:
    """``curve.json``/``curve.png`` for a trained checkpoint, and the first and last logged
    training loss (a student that learns shows the fall)."""
    points = curve.write(model_dir, title)
    if not points:
        return {}
    return {"path": str(model_dir / "curve.json"), "points": len(points),
            "first_loss": points[0]["loss"], "last_loss": points[-1]["loss"],
            "applied_learning_rate_max": max(p.get("applied_learning_rate", 0.0) for p in points)}


def augmented_data(task: glue.GlueTask, teacher_dir: Path, data_info: dict, folder: RunFolder,
                   variants: int, seed: int, cache: Path | None = None) -> tuple[dict, dict]:
    """The student's training data: the originals and their teacher-labelled variants, cached in
    the run folder (or ``cache``, shared by the runs of a sweep), keyed by task, teacher, data,
    count and seed."""
    from sparsebert.pipeline.augment import AugmentConfig, augment

    train_file = Path(data_info["splits"]["train"]["path"])
    cfg = AugmentConfig(variants, seed)
    path = augment(task, teacher_dir, train_file, (cache or folder.data_dir) / f"augment-n{variants}-s{seed}", cfg)
    columns = ["sentence1", "sentence2", "label"]
    rows = data_stage.read_jsonl(train_file) + [{k: v[k] for k in columns if k in v} for v in data_stage.read_jsonl(path)]
    combined = folder.data_dir / f"train-augmented-n{variants}-s{seed}.json"
    data_stage.write_jsonl(rows, combined)
    splits = {**data_info["splits"], "train": {"path": str(combined), "examples": len(rows)}}
    return {**data_info, "splits": splits}, {"variants_per_example": variants, "seed": seed,
                                              "variants_file": str(path), "student_train_examples": len(rows)}


def run(opts: StageOptions, teacher_cfg: TrainConfig, student_cfg: TrainConfig,
        int8_cfg: TrainConfig | None = None) -> dict:
    """Teacher, student and (with ``int8_cfg``) the INT8 student in one run folder; returns and
    writes metrics.json. Refuses what the CLI refuses (``request.check_stage``) and a run folder
    that holds an earlier result, unless ``opts.overwrite``. The new run is built beside it and
    takes its place only once whole, manifests and metrics.json written last; a run that fails
    keeps what it built (a finished teacher is worth reusing) and says where."""
    from sparsebert.pipeline.request import check_stage
    from sparsebert.runfolder import CHECKPOINTS

    check_stage(opts, teacher_cfg, student_cfg, int8_cfg)
    # An unknown model family, or a recipe naming no weight of the model, is refused now, not
    # when the student starts after the teacher's fine-tuning.
    family, _ = fitted_recipe(opts.model, student_cfg.recipe or str(recipe_path("sparsebert")))
    if int8_cfg and not set(family.model_types) & set(sparseml_mends.QUANTIZABLE_ATTENTION_FAMILIES):
        raise UserError(f"--int8 is for BERT models: SparseML's quantizable attention is mended for "
                        f"{', '.join(sparseml_mends.QUANTIZABLE_ATTENTION_FAMILIES)} only, not {family.name}")
    atomic.refuse_taken(opts.out, opts.overwrite)
    for given in (opts.teacher, opts.model):  # another run's checkpoint is checked before it is read
        if given and (Path(given) / "config.json").is_file():
            atomic.verify(Path(given))
    reads = (opts.teacher, opts.model, opts.augment_cache)  # may lie in a failed run's leftover
    _refuse_dropping_a_stopped_run(opts, reads)
    with atomic.building(opts.out, opts.overwrite, keep_on_error=True, in_use=reads, resume=opts.resume,
                         kept_for="the same command with --resume goes on from where it stopped") as partial:
        folder = RunFolder(partial)
        _same_request(partial, opts, teacher_cfg, student_cfg, int8_cfg)
        try:
            metrics = atomic.relocated(_train(opts, folder, teacher_cfg, student_cfg, int8_cfg), partial, opts.out)
        except BaseException as error:
            _name_a_finished_teacher(folder, error)
            raise
        atomic.write_json(folder.data_dir / "data.json", metrics["data"], indent=2)  # names files where they will be
        for written in (folder.data_dir, *map(folder.training_dir, CHECKPOINTS)):
            if written.is_dir():
                atomic.write_manifest(written, "train")
        folder.write_metrics(metrics)
    return metrics


class ResumeRefused(UserError):
    pass


# What a run was asked, in its folder: a resumed run must be asked the same.
REQUEST_FILE = "request.json"


def stopped_runs(out: Path) -> list[Path]:
    """What runs stopped after they began training left beside ``out``: work to go on with."""
    return [p for p in atomic.leftovers(out, [atomic.PARTIAL]) if (p / REQUEST_FILE).is_file()]


def _refuse_dropping_a_stopped_run(opts: StageOptions, reads) -> None:
    """A new run removes what stopped runs left beside ``out``; one that had begun training holds
    work worth going on with, so it is removed only when asked (``--overwrite``). One this run
    reads from (its teacher given to ``--teacher``) is kept anyway (``atomic.building``)."""
    read = [Path(r).resolve() for r in reads if r]
    stopped = [p for p in stopped_runs(opts.out) if not any(p.resolve() in (r, *r.parents) for r in read)]
    if stopped and not (opts.resume or opts.overwrite):
        raise ResumeRefused(f"a run stopped before it finished left {stopped[-1]}: pass --resume to go on with it, "
                            "or --overwrite to start again (it is then removed)")


def _same_request(partial: Path, opts: StageOptions, *configs: TrainConfig | None) -> None:
    """Record what this run is asked in ``partial``; when resuming, refuse a request that differs
    from the stopped run's (its checkpoints were trained for that one)."""
    asked = _request(opts, configs)
    path = partial / REQUEST_FILE
    if opts.resume:
        if not path.is_file():
            raise ResumeRefused(f"{partial} has no {REQUEST_FILE} (its run stopped before it began training): "
                                "run it again without --resume")
        before = json.loads(path.read_text())
        if before != asked:
            changed = sorted(_differences(before, asked))
            raise ResumeRefused(f"--resume must be asked what the stopped run in {partial} was: it differs in "
                                f"{', '.join(changed)}")
        print(f"[sparsebert] resuming the run stopped in {partial}", flush=True)
        return
    atomic.write_json(path, asked, indent=2)


def _request(opts: StageOptions, configs) -> dict:
    """What ``_same_request`` compares: the options and configs, each path as the absolute path it
    names (``--glue-dir data`` and ``--glue-dir $PWD/data`` ask the same), and each recipe's
    content (an edited recipe asks another schedule, which its checkpoints were not trained for)."""
    options = {k: v for k, v in asdict(opts).items() if k not in ("out", "overwrite", "resume")}
    for key in ("model", "model_name", "glue_dir", "teacher", "augment_cache"):
        options[key] = _absolute(options[key])
    settings = [asdict(c) if c else None for c in configs]
    for cfg in settings:
        if cfg and cfg.get("recipe"):
            cfg["recipe"] = _absolute(cfg["recipe"])
            cfg["recipe_sha256"] = hashlib.sha256(Path(cfg["recipe"]).read_bytes()).hexdigest()
    return json.loads(json.dumps({"options": options, "configs": settings}, default=str))


def _absolute(path):
    """A path that exists as its absolute form; anything else (a hub name, None) as it is."""
    return str(Path(path).expanduser().resolve()) if path is not None and Path(path).expanduser().exists() else path


def _differences(before, now, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in before.keys() | now.keys()
                for d in _differences(before.get(key), now.get(key), f"{where}.{key}" if where else key)]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        names = ["teacher", "student", "int8"] if where == "configs" else map(str, range(len(now)))
        return [d for name, b, n in zip(names, before, now) for d in _differences(b, n, f"{where}.{name}")]
    return [] if before == now else [f"{where} ({before!r} then, {now!r} now)"]


def _name_a_finished_teacher(folder: RunFolder, error: BaseException) -> None:
    """Say how to skip fine-tuning again the teacher a failed run finished (it saves its weights last)."""
    teacher = folder.training_dir("teacher")
    if (teacher / "config.json").is_file() and any(any(teacher.glob(f)) for f in checkpoint.WEIGHT_FILES):
        atomic.add_note(error, f"the teacher it fine-tuned is in {teacher}: pass `--teacher {teacher}` to reuse it")


def _train(opts: StageOptions, folder: RunFolder, teacher_cfg: TrainConfig, student_cfg: TrainConfig,
           int8_cfg: TrainConfig | None) -> dict:
    """Everything ``run`` trains and measures, in ``folder``; returns metrics.json's content."""
    started = time.time()
    task = glue.get_task(opts.task)
    data_info = data_stage.prepare(opts.task, opts.glue_dir, folder.data_dir, limit=opts.limit,
                                   seed=student_cfg.seed)
    dev_sets = {s: data_stage.read_jsonl(Path(data_info["splits"][s]["path"])) for s in glue.dev_splits(task)}

    if opts.teacher:
        teacher_dir = Path(opts.teacher)
    else:
        teacher_dir = folder.training_dir("teacher")
        teacher_data = data_stage.teacher_subset(data_info, folder.data_dir, opts.teacher_limit, student_cfg.seed)
        print(f"[sparsebert] fine-tuning the dense teacher on {task.name} "
              f"({teacher_data['splits']['train']['examples']:,} examples) -> {teacher_dir}", flush=True)
        train_teacher(opts.model, teacher_data, teacher_dir, teacher_cfg)
    teacher_done = time.time()

    student_data, augmentation = data_info, None
    if opts.augment:
        student_data, augmentation = augmented_data(task, teacher_dir, data_info, folder, opts.augment,
                                                    student_cfg.seed, opts.augment_cache)
    student_dir = folder.training_dir("student")
    student_start = str(teacher_dir) if opts.student_init == "teacher" else opts.model
    if opts.student_layers:
        student_start = str(first_layers(student_start, opts.student_layers, folder.path / "student-init"))
    print(f"[sparsebert] training the {'fine-tuned' if opts.student_init == 'teacher' else 'pre-trained'} "
          f"student{f' (first {opts.student_layers} layers)' if opts.student_layers else ''} with "
          f"{Path(student_cfg.recipe).name} while distilling -> {student_dir}", flush=True)
    train_student(student_start, teacher_dir, student_data, student_dir, student_cfg)
    student_done = time.time()
    if int8_cfg:
        int8_dir = folder.training_dir(INT8)
        print(f"[sparsebert] quantization-aware training of the student with {Path(int8_cfg.recipe).name} "
              f"while distilling -> {int8_dir}", flush=True)
        train_int8(student_dir, teacher_dir, student_data, int8_dir, int8_cfg)
    int8_done = time.time()

    patterns = checkpoint.pruned_patterns(student_dir)
    # A local pre-trained folder (the embedded default included) shows how far training moved
    # the weights; a hub name is not downloaded again for it.
    pretrained = checkpoint.load_weights(Path(opts.model)) if (Path(opts.model) / "config.json").is_file() else None
    teacher = describe(task, teacher_dir, dev_sets, teacher_cfg.max_seq_length, patterns, pretrained)
    student = describe(task, student_dir, dev_sets, student_cfg.max_seq_length, patterns, pretrained)
    if not opts.teacher:
        teacher["curve"] = write_curve(teacher_dir, f"{task.name}: dense teacher")
    student["curve"] = write_curve(student_dir, f"{task.name}: student of {opts.student_layers} layer(s), dense, "
                                                "distilled" if opts.student_layers else
                                   f"{task.name}: student pruned to {student['encoder_linear_sparsity']:.0%} while distilled")
    int8 = None
    if int8_cfg:
        # Weights moved are counted from the FP32 student it started from.
        int8 = describe(task, folder.training_dir(INT8), dev_sets, int8_cfg.max_seq_length, patterns,
                        checkpoint.load_weights(student_dir))
        int8["curve"] = write_curve(folder.training_dir(INT8), f"{task.name}: quantization-aware training "
                                                               "of the sparse student (INT8)")
    baseline = report.majority_baseline(
        task, data_stage.read_jsonl(Path(data_info["splits"]["train"]["path"])), dev_sets)
    main_dev, metric = glue.dev_splits(task)[0], task.main_metric
    metrics = {
        "task": task.name,
        "main_metric": metric,
        "model": opts.model_name or opts.model,
        "model_path": opts.model,
        "data": data_info,
        "baseline": baseline,
        "teacher": teacher,
        "student": student,
        "student_beats_baseline": all(student["dev"][split][metric] > baseline[split][metric] for split in dev_sets),
        "retention": student["dev"][main_dev][metric] / teacher["dev"][main_dev][metric]
        if teacher["dev"][main_dev][metric] else None,
        "augmentation": augmentation,
        "task_schedule": opts.task_schedule,
        "student_layers": opts.student_layers,
        **({INT8: int8, "int8_cost_points": student["dev"][main_dev][metric] - int8["dev"][main_dev][metric]}
           if int8 else {}),
        "config": {"teacher": asdict(teacher_cfg), "student": asdict(student_cfg),
                   **({INT8: asdict(int8_cfg)} if int8_cfg else {})},
        "wall_seconds": {"teacher": teacher_done - started, "student": student_done - teacher_done,
                         **({INT8: int8_done - student_done} if int8_cfg else {}),
                         "total": time.time() - started},
        "machine": hardware.describe(),
    }
    return metrics


# BERT-base's six encoder linears per layer, 12 layers: 12 x (4 x 768^2 + 2 x 768 x 3072).
BERT_BASE_ENCODER_LINEARS = 12 * (4 * 768 * 768 + 2 * 768 * 3072)


def weights_left_line(student: dict) -> str:
    """How many encoder-linear weights the student keeps, set against BERT-base's: the paper's
    95% of BERT-base leaves 4.25 M, so a smaller model at the same sparsity is far sparser in
    what it has left to learn with."""
    kept = student["parameters_nonzero_encoder_linears"]
    like = 1 - kept / BERT_BASE_ENCODER_LINEARS
    return (f"  non-zero encoder-linear weights {kept / 1e6:.2f} M of {student['parameters_encoder_linears'] / 1e6:.2f} M; "
            f"BERT-base at 95% (the paper's regime) keeps {0.05 * BERT_BASE_ENCODER_LINEARS / 1e6:.2f} M, "
            f"so this is as few as BERT-base pruned to {like:.1%}")


def _scores(dev: dict, metrics: tuple) -> str:
    return ", ".join(f"{m} {dev[m]:6.2f}" for m in metrics if m in dev)


def _int8_line(metrics: dict, split: str, metric: str) -> str:
    q = metrics.get(INT8)
    if not q:
        return ""
    return (f"  INT8 student      {metric} {q['dev'][split][metric]:6.2f}  ({-metrics['int8_cost_points']:+.2f} points "
            f"against the FP32 student), encoder-linear sparsity {q['encoder_linear_sparsity'] * 100:.2f}%")


def summary(metrics: dict) -> str:
    """A few lines a person reads at the end of a run."""
    task = glue.get_task(metrics["task"])
    first_dev, metric, shown = glue.dev_splits(task)[0], task.main_metric, task.metrics
    t, s, b = metrics["teacher"], metrics["student"], metrics["baseline"][first_dev]
    curve_line = ""
    if s.get("curve"):
        curve_line = (f"  student training loss {s['curve']['first_loss']:.4f} (first log) -> "
                      f"{s['curve']['last_loss']:.4f} (last); {s['curve']['path']} and curve.png")
    kind = "constant" if task.is_regression else "majority"
    smaller = "more --student-layers" if metrics.get("student_layers") else "a lower --sparsity"
    verdict = (f"  the student beats the {kind} baseline" if metrics["student_beats_baseline"] else
               f"  WARNING: the student does NOT beat the {kind} baseline; "
               f"try {smaller}, more --student-epochs or --augment N")
    return "\n".join(line for line in [
        f"task {metrics['task']} ({first_dev}; final model, main metric {metric}):",
        f"  majority baseline {_scores(b, shown)}  (always {b['label']!r})" if "label" in b else
        f"  constant baseline {_scores(b, shown)}",
        f"  dense teacher     {_scores(t['dev'][first_dev], shown)}",
        f"  sparse student    {_scores(s['dev'][first_dev], shown)}"
        + (f"  ({metrics['retention'] * 100:.1f}% of the teacher)" if metrics["retention"] is not None else ""),
        verdict,
        curve_line,
        f"  kept weights moved from the pre-trained model by training: {s['kept_weights_moved']:.1%}"
        if s.get("kept_weights_moved") is not None else "",
        f"  encoder-linear sparsity {s['encoder_linear_sparsity'] * 100:.2f}% "
        f"(least sparse matrix {s['min_matrix_sparsity'] * 100:.2f}%), "
        f"non-zero parameters {s['parameters_nonzero_total']:,} of {s['parameters_total']:,}",
        weights_left_line(s) if "parameters_nonzero_encoder_linears" in s else "",
        _int8_line(metrics, first_dev, metric),
        f"  encoder FLOPs/sequence {s['flops']['dense_encoder_flops'] / 1e9:.2f} G dense -> "
        f"{s['flops']['sparse_encoder_flops'] / 1e9:.2f} G sparse "
        f"({s['flops']['encoder_flops_reduction']:.1f}x fewer)",
        f"  wall time {metrics['wall_seconds']['total'] / 60:.1f} min",
    ] if line)
