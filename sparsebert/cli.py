"""``sparsebert``: one small CLI that strings the stages together.

    sparsebert train  --task rte --out runs/rte      # teacher, then pruned student; metrics.json
    sparsebert export runs/rte                        # ONNX deployment/ folders
    sparsebert parity runs/rte                        # PyTorch vs ONNX Runtime vs DeepSparse
    sparsebert serve  runs/rte                        # deepsparse.server on 127.0.0.1
    sparsebert bench  runs/rte                        # latency, sparse vs dense
    sparsebert gates  runs/rte                        # CI thresholds on the reports
    sparsebert run    --task rte --out runs/rte      # train + export + parity + bench

Heavy libraries are imported only after the arguments are checked and the offline switches
are set, so ``--help`` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sparsebert import offline
from sparsebert.errors import UserError


class UsageError(UserError):
    pass


def _training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="GLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli")
    p.add_argument("--out", type=Path, help="run folder (default runs/<task>)")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"),
                   help="local folder in the glue_data layout (default $GLUE_DIR; if unset, the hub)")
    p.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="pre-trained BERT: the embedded default, a local folder or a hub name")
    p.add_argument("--teacher", help="reuse this fine-tuned teacher folder instead of training one")
    p.add_argument("--sparsity", type=float, default=0.95, help="final sparsity of the encoder linears")
    p.add_argument("--teacher-epochs", type=float, default=3.0)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-epochs", type=float, default=10.0)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--recipe", default="sparsebert", help="recipe file or name in recipes/")
    p.add_argument("--recipe-args", help='JSON object of recipe variables, e.g. \'{"prune_end_fraction": 0.5}\'')
    p.add_argument("--limit", type=int, help="use at most N train and N dev examples (smoke runs)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsebert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _training_arguments(sub.add_parser("train", help="fine-tune the teacher, then prune+distill the student"))
    return parser


def _check_training(args) -> None:
    """Everything that can be checked before a model is loaded or a step is taken."""
    from sparsebert import glue

    glue.get_task(args.task)
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    for name in ("teacher_epochs", "student_epochs", "teacher_lr", "student_lr"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.glue_dir is not None and not Path(args.glue_dir).is_dir():
        raise UsageError(f"GLUE directory not found: {args.glue_dir}")
    if args.teacher and not (Path(args.teacher) / "config.json").is_file():
        raise UsageError(f"--teacher {args.teacher} is not a model folder (no config.json)")
    args.out = args.out or Path("runs") / glue.get_task(args.task).name


def cmd_train(args) -> int:
    _check_training(args)
    from sparsebert import models

    offline.configure(hub=models.is_hub_name(args.model) or args.glue_dir is None)
    from sparsebert.pipeline import stage
    from sparsebert.pipeline.train import TrainConfig
    from sparsebert.recipe import check_recipe, parse_recipe_args, recipe_path

    model = models.resolve_model(args.model)
    recipe = recipe_path(args.recipe)
    recipe_args = {"final_sparsity": args.sparsity, **parse_recipe_args(args.recipe_args)}
    check_recipe(recipe, recipe_args)
    stage.claim(args.out, args.overwrite)
    common = dict(batch_size=args.batch_size, max_seq_length=args.max_seq_length, seed=args.seed)
    teacher_cfg = TrainConfig(epochs=args.teacher_epochs, learning_rate=args.teacher_lr, **common)
    student_cfg = TrainConfig(epochs=args.student_epochs, learning_rate=args.student_lr,
                              recipe=str(recipe), recipe_args=recipe_args, **common)
    opts = stage.StageOptions(task=args.task, model=model, out=args.out, glue_dir=args.glue_dir,
                              teacher=args.teacher, limit=args.limit, overwrite=args.overwrite)
    metrics = stage.run(opts, teacher_cfg, student_cfg)
    print(stage.summary(metrics))
    print(f"[sparsebert] wrote {args.out / 'metrics.json'}")
    return 0


COMMANDS = {"train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    offline.configure()  # before anything imports SparseML, DeepSparse or Hugging Face
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:  # one clear line for anything the user can fix
        print(f"sparsebert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
