"""SparseML's own console script (the documented entry point), run on a run folder's data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sparseml_script(run: Path, out: Path, epochs: int, sparsity: float, batch_size: int, *extra: str):
    """Prune the embedded default model while distilling it from ``run``'s teacher, offline."""
    from sparsebert.models import embedded_default

    script = shutil.which("sparseml.transformers.train.text_classification", path=str(Path(sys.executable).parent))
    assert script, "SparseML console script missing"
    finished = subprocess.run([
        script, "--model_name_or_path", str(embedded_default()), "--distill_teacher", str(run / "teacher"),
        "--recipe", str(REPO / "recipes" / "sparsebert.yaml"),
        "--recipe_args", f'{{"num_epochs": {epochs}, "final_sparsity": {sparsity}}}', "--num_train_epochs", str(epochs),
        "--train_file", str(run / "data" / "train.json"), "--validation_file", str(run / "data" / "dev.json"),
        "--input_column_names", "sentence1,sentence2", "--label_column_name", "label",
        "--max_seq_length", "64", "--per_device_train_batch_size", str(batch_size), "--output_dir", str(out),
        "--do_train", "--report_to", "none", "--save_strategy", "no", *extra,
    ], env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, cwd=out.parent,
        capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return out
