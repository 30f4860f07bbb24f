"""Writes that cannot leave a half result: a stage killed or failing mid-write leaves the earlier
result or nothing, and a later stage refuses a folder whose manifest no longer matches it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsebert.cli import main
from sparsebert.runfolder import RunFolder


def _killed_halfway(script: str, *args) -> None:
    """Run ``script`` in a fresh Python, SIGKILL it once it prints "halfway"."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "halfway"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


WRITE_JSONL_THEN_STALL = """
    import sys, time
    from pathlib import Path
    from sparsebert.pipeline.data import write_jsonl

    def examples():  # far more than a write buffer, then a stall until killed
        for i in range(100_000):
            if i == 2_000:
                print("halfway", flush=True)
                time.sleep(120)
            yield {"sentence1": "a sentence long enough to fill the buffer " * 3, "label": i % 2}

    write_jsonl(examples(), Path(sys.argv[1]))
"""


def test_a_data_file_killed_mid_write_keeps_its_old_content(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"sentence1": "the earlier file", "label": 1}\n')
    _killed_halfway(WRITE_JSONL_THEN_STALL, path)
    assert path.read_text() == '{"sentence1": "the earlier file", "label": 1}\n'
    _killed_halfway(WRITE_JSONL_THEN_STALL, tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists()  # nothing, rather than a cut-short file


def test_metrics_stay_whole_when_the_rename_fails(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    run.write_metrics({"task": "rte", "note": "earlier"})

    def refused(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match="disk gone"):
        run.write_metrics({"task": "rte", "note": "new " * 10_000})
    assert json.loads(run.metrics_path.read_text()) == {"task": "rte", "note": "earlier"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


BUILD_THEN_STALL = """
    import sys, time
    from pathlib import Path
    from sparsebert import atomic

    with atomic.building(Path(sys.argv[1])) as partial:
        (partial / "model.onnx").write_bytes(b"half a model")
        print("halfway", flush=True)
        time.sleep(120)
"""


def test_a_stage_killed_mid_folder_leaves_the_earlier_folder_and_a_leftover_the_next_run_removes(tmp_path):
    from sparsebert import atomic

    folder = tmp_path / "export" / "student"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"the earlier model")
    _killed_halfway(BUILD_THEN_STALL, folder)
    assert [p.name for p in folder.iterdir()] == ["model.onnx"]
    assert (folder / "model.onnx").read_bytes() == b"the earlier model"
    assert [p.name.split("-")[0] for p in atomic.leftovers(folder)] == ["student.partial"]
    with atomic.building(folder) as partial:
        (partial / "model.onnx").write_bytes(b"the new model")
    assert atomic.leftovers(folder) == []
    assert (folder / "model.onnx").read_bytes() == b"the new model"


def test_a_run_folder_that_is_only_a_leftover_is_refused_as_such(tmp_path, capsys):
    (tmp_path / "rte.partial-999999999").mkdir()  # no such process: a killed `sparsebert train`
    assert main(["parity", str(tmp_path / "rte")]) == 2
    err = capsys.readouterr().err.strip()
    assert "rte.partial-999999999, left by a run that was stopped before it finished" in err
    assert "\n" not in err


# ---------------------------------------------------------------- the stages, on a real tiny run


@pytest.fixture
def run_copy(exported_run, tmp_path) -> Path:
    """A copy of the tiny trained and exported run, free to damage."""
    run = tmp_path / "rte"
    shutil.copytree(exported_run, run)
    return run


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_each_stage_output_carries_a_manifest(run_copy):
    for folder in ("data", "teacher", "student", "export/student", "export/teacher"):
        manifest = json.loads((run_copy / folder / "manifest.json").read_text())
        assert manifest["stage"] == ("export" if folder.startswith("export") else "train")
        listed = {f["path"]: f for f in manifest["files"]}
        assert ("deployment/model.onnx" if folder.startswith("export") else
                "train.json" if folder == "data" else "model.safetensors") in listed
        for path, entry in listed.items():
            assert (run_copy / folder / path).stat().st_size == entry["bytes"]
    for report in ("metrics.json", "data/data.json"):  # paths name where the run is, not where it was built
        assert ".partial-" not in (run_copy / report).read_text()


def test_export_refuses_a_checkpoint_changed_since_training(run_copy, capsys):
    weights = run_copy / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of a weight: same size, other content
    weights.write_bytes(bytes(data))
    err = _one_line_error(["export", str(run_copy), "--overwrite"], capsys)
    assert f"{weights} has changed" in err and "`sparsebert train`" in err
    assert (run_copy / "export" / "student" / "deployment" / "model.onnx").is_file()  # earlier export kept


def test_parity_refuses_a_cut_short_onnx_file(run_copy, capsys):
    onnx_file = run_copy / "export" / "student" / "deployment" / "model.onnx"
    size = onnx_file.stat().st_size
    with open(onnx_file, "r+b") as f:
        f.truncate(size // 2)
    err = _one_line_error(["parity", str(run_copy)], capsys)
    assert f"{onnx_file} has {size // 2} bytes where its manifest says {size}" in err


def test_a_folder_without_a_manifest_is_read_and_the_export_gets_one(run_copy):
    for folder in ("data", "teacher", "student"):  # as an older version wrote them
        (run_copy / folder / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(run_copy / "export")
    assert main(["export", str(run_copy)]) == 0
    manifest = json.loads((run_copy / "export" / "student" / "manifest.json").read_text())
    assert manifest["stage"] == "export"


def test_an_export_failing_midway_with_overwrite_keeps_the_earlier_export(run_copy, monkeypatch):
    from sparsebert.deploy import export

    export_folder = run_copy / "export" / "student"
    before = {p: p.read_bytes() for p in export_folder.rglob("*") if p.is_file()}
    parity_report = run_copy / "parity-student.json"
    parity_report.write_text("{}")  # measured on the earlier export: kept with it

    def fails_after_writing_the_onnx_file(*_, **__):
        raise RuntimeError("stopped midway")

    monkeypatch.setattr(export, "logits_difference", fails_after_writing_the_onnx_file)
    with pytest.raises(RuntimeError, match="stopped midway"):
        main(["export", str(run_copy), "--overwrite"])
    assert {p: p.read_bytes() for p in export_folder.rglob("*") if p.is_file()} == before
    assert parity_report.is_file()
    assert sorted(p.name for p in export_folder.parent.iterdir()) == ["student", "teacher"]  # no leftover


def test_training_failing_midway_with_overwrite_keeps_the_earlier_run(run_copy, exported_run, glue_dir,
                                                                      monkeypatch):
    from sparsebert.pipeline import stage

    before = (run_copy / "metrics.json").read_bytes()

    def fails(*_, **__):
        raise RuntimeError("student training stopped midway")

    monkeypatch.setattr(stage, "train_student", fails)
    with pytest.raises(RuntimeError, match="stopped midway"):
        main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(run_copy), "--limit", "8",
              "--teacher", str(exported_run / "teacher"), "--overwrite"])
    assert (run_copy / "metrics.json").read_bytes() == before
    assert (run_copy / "export" / "student" / "deployment" / "model.onnx").is_file()
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["rte"]  # no leftover beside it
