"""Shared fixtures: real GLUE data from ../shared/data/glue (or $GLUE_DIR), and one tiny run
of the training stage that the pipeline and deploy tests both read."""

import os
from pathlib import Path

import pytest

from sparsebert import offline

offline.configure()  # tests never touch the network

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "RTE" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found in {GLUE_DIR} (set GLUE_DIR)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def trained_run(glue_dir, tmp_path_factory) -> Path:
    """`sparsebert train` on 48 RTE examples: 1 teacher epoch, 2 student epochs to 90%."""
    from sparsebert.cli import main

    run = tmp_path_factory.mktemp("runs") / "rte"
    code = main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(run), "--limit", "48",
                 "--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "16",
                 "--max-seq-length", "64", "--sparsity", "0.9"])
    assert code == 0
    return run


@pytest.fixture(scope="session")
def exported_run(trained_run) -> Path:
    from sparsebert.cli import main

    assert main(["export", str(trained_run)]) == 0
    return trained_run
