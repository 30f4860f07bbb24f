"""A run folder, as one typed object: where each stage writes, and what it wrote.

    <run>/data/                       train.json, the dev split(s), data.json
    <run>/teacher/, <run>/student/    checkpoints (a reused --teacher lives elsewhere: metrics.json says where)
    <run>/student-int8/               the student after quantization-aware training (--int8), if asked for
    <run>/metrics.json                dev metrics, baseline, measured sparsity
    <run>/export/<which>/             export.json and deployment/ (model.onnx, serving.json, ...)
    <run>/parity-<which>.json         PyTorch vs ONNX Runtime vs DeepSparse, every dev split
    <run>/parity-served-<which>.json  the running server's answers vs PyTorch's
    <run>/bench/                      bench.json, bench.md, bench.png

The training stage builds the whole run folder, and export each ``export/<which>/``, under a
``.partial-<pid>`` name that takes the folder's place only when the stage finished (``atomic``).
``data/``, each checkpoint and each ``export/<which>/`` hold a ``manifest.json``, checked here
before a stage reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sparsebert import atomic, glue
from sparsebert.errors import UserError

CHECKPOINTS = ("student", "teacher", "student-int8")
INT8 = "student-int8"


class RunFolderError(UserError):
    pass


@dataclass(frozen=True)
class RunFolder:
    path: Path
    # Folders whose manifest was checked already: a stage reads one several times.
    _verified: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))  # a folder given as text reads the same

    # ---------------------------------------------------------------- layout

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def bench_dir(self) -> Path:
        return self.path / "bench"

    def training_dir(self, which: str) -> Path:
        """Where the training stage writes a checkpoint (``checkpoint`` says which one a run used)."""
        return self.path / _checked(which)

    def export_dir(self, which: str) -> Path:
        return self.path / "export" / _checked(which)

    def parity_path(self, which: str, served: bool = False) -> Path:
        return self.path / f"parity-{'served-' if served else ''}{_checked(which)}.json"

    # ---------------------------------------------------------------- what the stages wrote

    @cached_property
    def metrics(self) -> dict:
        if not self.metrics_path.is_file():
            atomic.refuse_leftover_only(self.path, "sparsebert train")
            raise RunFolderError(f"{self.metrics_path} not found; is {self.path} a run folder written "
                                 "by `sparsebert train`?")
        return json.loads(self.metrics_path.read_text())

    def write_metrics(self, metrics: dict) -> None:
        atomic.write_json(self.metrics_path, metrics, indent=2)
        self.__dict__.pop("metrics", None)

    @property
    def task(self) -> glue.GlueTask:
        return glue.get_task(self.metrics["task"])

    def checkpoint(self, which: str, only: tuple[str, ...] | None = None) -> Path:
        """The run's own checkpoint folder (found where it is, should the run folder have moved),
        else where metrics.json says it is (a reused ``--teacher``), its manifest checked: on
        ``only`` (the files a stage reads, relative paths) when given, else on every file."""
        own = self.training_dir(which)
        folder = own if (own / "config.json").is_file() else Path(self.metrics[which]["path"])
        if not folder.is_dir():
            raise RunFolderError(f"{folder} not found; the run's {which} checkpoint is needed (re-run `sparsebert train`)")
        return self.verified(folder, only)

    def verified(self, folder: Path, only: tuple[str, ...] | None = None) -> Path:
        """``folder``, once its manifest (where it has one) matches its files (those of ``only``)."""
        if (folder, only) not in self._verified and (folder, None) not in self._verified:
            atomic.verify(folder, only)
            self._verified.add((folder, only))
        return folder

    @property
    def checkpoints(self) -> list[str]:
        """The checkpoints this run trained: the student and the teacher, and the INT8 student
        when it was asked for."""
        return [which for which in CHECKPOINTS if which != INT8 or INT8 in self.metrics]

    @property
    def dev_splits(self) -> list[str]:
        """Every dev split the run measured (MNLI: matched and mismatched), main one first."""
        return [s for s in self.metrics["data"]["splits"] if s != "train"]

    def examples(self, split: str) -> list[dict]:
        """A split's examples, from the run's own data folder (wherever the run folder now is)."""
        from sparsebert.pipeline.data import read_jsonl

        path = self.verified(self.data_dir) / f"{split}.json"
        if not path.is_file():
            raise RunFolderError(f"{path} not found; the run's data files are needed (re-run `sparsebert train`)")
        return read_jsonl(path)

    def deployment(self, which: str) -> Path:
        if which not in self.checkpoints:
            raise RunFolderError(f"{self.path} has no INT8 student; train it with `sparsebert train --int8`")
        atomic.refuse_leftover_only(self.export_dir(which), f"sparsebert export {self.path} --overwrite")
        folder = self.verified(self.export_dir(which)) / "deployment"
        if not (folder / "model.onnx").is_file():
            raise RunFolderError(f"{folder}/model.onnx not found; run `sparsebert export {self.path}` first")
        return folder

    def serving(self, which: str) -> dict:
        """The deployment's ``serving.json``: task, one text or a pair, exported length."""
        path = self.deployment(which) / "serving.json"
        if not path.is_file():
            raise RunFolderError(f"{path} not found; re-run `sparsebert export {self.path} --overwrite`")
        return json.loads(path.read_text())

    def exported_length(self, which: str) -> int:
        """The sequence length the ONNX file was exported (and its parity measured) with."""
        return int(self.serving(which)["sequence_length"])


def _checked(which: str) -> str:
    if which not in CHECKPOINTS:
        raise RunFolderError(f"unknown checkpoint {which!r}; choose one of {CHECKPOINTS}")
    return which
