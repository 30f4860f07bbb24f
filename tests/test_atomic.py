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

    with atomic.building(Path(sys.argv[1]), overwrite=True) as partial:
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
    with atomic.building(folder, overwrite=True) as partial:
        (partial / "model.onnx").write_bytes(b"the new model")
    assert atomic.leftovers(folder) == []
    assert (folder / "model.onnx").read_bytes() == b"the new model"


def test_a_run_folder_that_is_only_a_leftover_is_refused_as_such(tmp_path, capsys):
    (tmp_path / "rte.partial-999999999").mkdir()  # no such process: a killed `sparsebert train`
    assert main(["parity", str(tmp_path / "rte")]) == 2
    err = capsys.readouterr().err.strip()
    assert "rte.partial-999999999, left by a run that was stopped before it finished" in err
    assert "\n" not in err


def _result(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(content)
    return folder


def _failing_on_call(monkeypatch, failing_call: int, error: BaseException):
    """os.replace, failing on its ``failing_call``-th call (counted from 1)."""
    calls, real_replace = [], os.replace

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("error", [OSError("disk gone"), KeyboardInterrupt()])
def test_a_failing_second_rename_puts_the_earlier_result_back(tmp_path, monkeypatch, error):
    from sparsebert import atomic

    folder = _result(tmp_path / "student", b"the earlier model")
    with pytest.raises(type(error)):
        with atomic.building(folder, overwrite=True) as partial:
            (partial / "model.onnx").write_bytes(b"the new model")
            _failing_on_call(monkeypatch, 2, error)  # 1: earlier result set aside, 2: new one put in place
    assert (folder / "model.onnx").read_bytes() == b"the earlier model"
    assert [p.name for p in atomic.leftovers(folder)] == [partial.name]  # the new result, not deleted either
    assert (partial / "model.onnx").read_bytes() == b"the new model"


def test_a_result_set_aside_by_a_run_killed_between_its_renames_is_put_back_never_deleted(tmp_path, capsys):
    from sparsebert import atomic

    folder = tmp_path / "rte"  # killed between the renames: the earlier run set aside, the new one beside
    _result(tmp_path / "rte.replaced-999999999", b"the earlier run")
    _result(tmp_path / "rte.partial-999999999", b"the new run")
    assert main(["parity", str(folder)]) == 2  # a reader names it
    err = capsys.readouterr().err.strip()
    assert "rte.replaced-999999999 holds its earlier result" in err and "\n" not in err
    with pytest.raises(atomic.OutputRefused, match="already holds a result"):  # the next run, without --overwrite
        with atomic.building(folder):
            pass
    assert (folder / "model.onnx").read_bytes() == b"the earlier run"
    assert not (tmp_path / "rte.replaced-999999999").exists()  # renamed back, not copied

    set_aside = _result(tmp_path / "rte.replaced-888888888", b"a run stopped while removing it")
    with atomic.building(folder, overwrite=True) as partial:
        (partial / "model.onnx").write_bytes(b"the newest run")
    assert (folder / "model.onnx").read_bytes() == b"the newest run"
    assert (set_aside / "model.onnx").read_bytes() == b"a run stopped while removing it"
    assert f"{set_aside} holds a result set aside" in capsys.readouterr().out


def test_a_result_another_run_finished_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    from sparsebert import atomic

    folder = tmp_path / "rte"
    with pytest.raises(atomic.OutputRefused) as refused:
        with atomic.building(folder) as partial:  # --out was free when the run began
            (partial / "model.onnx").write_bytes(b"this run")
            _result(folder, b"the other run, finished first")
    assert (folder / "model.onnx").read_bytes() == b"the other run, finished first"
    assert (partial / "model.onnx").read_bytes() == b"this run"  # kept, and named
    assert f"this run's result is kept in {partial}" in str(refused.value) and "\n" not in str(refused.value)


def test_a_leftover_whose_lock_is_held_is_kept_whatever_its_process_id(tmp_path):
    from sparsebert import atomic

    folder = tmp_path / "run[1]"  # glob would read [1] as a pattern
    building_elsewhere = _result(tmp_path / "run[1].partial-999999999", b"a live run in another container")
    lock = atomic._try_lock(building_elsewhere)  # its holder, as far as this process can tell
    stopped = _result(tmp_path / f"run[1].partial-{os.getpid()}", b"stopped")  # a live pid, but no lock held
    init = _result(tmp_path / "run[1].partial-1", b"stopped in a container where it was pid 1")
    sibling = _result(tmp_path / "run[1].partial-data", b"not a leftover")
    try:
        with atomic.building(folder) as partial:
            (partial / "model.onnx").write_bytes(b"new")
    finally:
        os.close(lock)
    assert building_elsewhere.is_dir() and sibling.is_dir()
    assert not stopped.exists() and not init.exists()
    assert (folder / "model.onnx").read_bytes() == b"new" and not (folder / atomic.LOCK).exists()


def test_out_that_is_a_link_a_mount_point_or_the_working_folder(tmp_path, monkeypatch):
    from sparsebert import atomic

    target = _result(tmp_path / "disk" / "rte", b"the earlier run")
    link = tmp_path / "rte"
    link.symlink_to(target)
    with atomic.building(link, overwrite=True) as partial:
        (partial / "model.onnx").write_bytes(b"the new run")
    assert partial.parent == target.parent  # built beside the target, renamed onto it
    assert link.is_symlink() and (link / "model.onnx").read_bytes() == b"the new run"
    assert sorted(p.name for p in target.parent.iterdir()) == ["rte"]

    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path).resolve() == target.resolve())
    with pytest.raises(atomic.OutputRefused, match="mount point.*give a folder inside it"):
        atomic.building(link, overwrite=True).__enter__()
    monkeypatch.chdir(target.parent)
    for here in (".", str(target.parent), ".."):
        with pytest.raises(atomic.OutputRefused, match="holds the folder this command runs in"):
            atomic.building(Path(here), overwrite=True).__enter__()


def test_a_failing_cleanup_of_the_replaced_result_does_not_fail_the_stage(tmp_path, monkeypatch, capsys):
    from sparsebert import atomic

    folder = _result(tmp_path / "rte", b"the earlier run")
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None)  # removes nothing
    with atomic.building(folder, overwrite=True) as partial:
        (partial / "model.onnx").write_bytes(b"the new run")
    assert (folder / "model.onnx").read_bytes() == b"the new run"
    assert "could not remove all of" in capsys.readouterr().err


def test_a_manifest_checks_what_a_reader_needs_and_only_a_manifest_of_ours(tmp_path):
    from sparsebert import atomic

    folder = _result(tmp_path / "student", b"weights")
    (folder / "recipe.yaml").write_text("modifiers: []")
    (folder / "optimizer.pt").write_bytes(b"resume state")
    atomic.write_manifest(folder, "train")
    assert "optimizer.pt" not in (folder / "manifest.json").read_text()
    (folder / "optimizer.pt").unlink()  # deleted to save space
    (folder / "model.onnx").unlink()
    atomic.verify(folder, only=("recipe.yaml",))  # what gates reads is whole
    with pytest.raises(atomic.DamagedOutput, match="model.onnx is missing"):
        atomic.verify(folder)

    (folder / "manifest.json").write_text(json.dumps({"name": "another tool's", "files": ["x"]}))
    atomic.verify(folder)  # not ours: read as it is
    (folder / "manifest.json").write_text(json.dumps({"stage": "train", "files": [{"bytes": 1}]}))
    with pytest.raises(atomic.DamagedOutput, match="without its path") as refused:
        atomic.verify(folder)
    assert "\n" not in str(refused.value)


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


def test_training_failing_midway_with_overwrite_keeps_the_earlier_run_and_what_it_built(
        run_copy, exported_run, glue_dir, monkeypatch, capsys):
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
    kept = [p for p in run_copy.parent.iterdir() if p.name != "rte"]
    assert [p.name.split("-")[0] for p in kept] == ["rte.partial"] and (kept[0] / "data" / "train.json").is_file()
    assert f"kept in {kept[0]}" in capsys.readouterr().err


def test_a_checkpoint_folder_that_is_gone_is_refused_in_one_line(tmp_path):
    from sparsebert.runfolder import RunFolderError

    run = RunFolder(tmp_path)
    run.write_metrics({"task": "rte", "teacher": {"path": str(tmp_path / "elsewhere" / "teacher")}})
    with pytest.raises(RunFolderError, match="elsewhere/teacher not found; the run's teacher checkpoint is needed"):
        run.checkpoint("teacher")


def test_what_a_run_reads_may_not_lie_in_the_run_folder_it_replaces(run_copy, glue_dir):
    """Refused by ``stage.run`` itself (``check_options``), not only by the CLI."""
    from sparsebert.pipeline.request import TrainingRefused, check_options
    from sparsebert.pipeline.stage import StageOptions

    base = dict(task="rte", model="all-MiniLM-L6-v2", out=run_copy, glue_dir=str(glue_dir), overwrite=True)
    for given, flag in ((dict(teacher=str(run_copy / "teacher")), "--teacher"),
                        (dict(model=str(run_copy / "student")), "--model"),
                        (dict(augment=1, augment_cache=run_copy / "cache"), "--augment-cache")):
        with pytest.raises(TrainingRefused, match=f"{flag} .* is inside --out .*, which this run replaces"):
            check_options(StageOptions(**{**base, **given}))


def test_an_export_failing_its_checks_keeps_its_report_and_the_earlier_export(run_copy, monkeypatch, capsys):
    from sparsebert.deploy import export

    export_folder = run_copy / "export" / "student"
    before = {p: p.read_bytes() for p in export_folder.rglob("*") if p.is_file()}
    monkeypatch.setattr(export, "logits_difference", lambda *_: 0.5)  # far over the student's limit
    assert main(["export", str(run_copy), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the exporter's progress bars
    assert err.startswith("sparsebert export: error:")
    failed = run_copy / "export" / "student-failed-export.json"
    assert "ONNX logits differ from PyTorch by 5.00e-01" in err and f"its report: {failed}" in err
    assert json.loads(failed.read_text())["max_logit_difference"] == 0.5
    assert {p: p.read_bytes() for p in export_folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in export_folder.parent.iterdir()) == ["student", "student-failed-export.json",
                                                                      "teacher"]


def test_a_failed_training_names_the_teacher_it_finished_and_the_next_run_can_reuse_it(
        tmp_path, glue_dir, monkeypatch, capsys):
    from sparsebert.pipeline import stage

    def fails(*_, **__):
        raise RuntimeError("student training stopped midway")

    monkeypatch.setattr(stage, "train_student", fails)
    out = tmp_path / "rte"
    train = ["train", "--task", "rte", "--glue-dir", str(glue_dir), "--out", str(out), "--limit", "8",
             "--teacher-epochs", "1", "--max-seq-length", "32"]
    with pytest.raises(RuntimeError, match="stopped midway"):
        main(train)
    [kept] = [p for p in tmp_path.iterdir()]
    teacher = kept / "teacher"
    assert f"pass `--teacher {teacher}` to reuse it" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="stopped midway"):
        main(train + ["--teacher", str(teacher)])  # the same --out: its leftovers are removed, not this one
    assert f"keeping {kept}: this run reads from it" in capsys.readouterr().out
    assert (teacher / "config.json").is_file()


def test_an_export_killed_midway_leaves_the_earlier_export_to_read_and_the_next_export_cleans_up(run_copy):
    """`sparsebert export --overwrite` in its own process, SIGKILLed once the new ONNX file appears
    in the folder it builds."""
    import time

    export_folder = run_copy / "export" / "student"
    before = {p: p.read_bytes() for p in export_folder.rglob("*") if p.is_file()}
    child = subprocess.Popen([str(Path(sys.executable).parent / "sparsebert"), "export", str(run_copy), "--overwrite"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(export_folder.parent.glob("student.partial-*/deployment/model.onnx")):
            assert child.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert [p.name.split("-")[0] for p in export_folder.parent.iterdir() if ".partial-" in p.name] == ["student.partial"]
    assert {p: p.read_bytes() for p in export_folder.rglob("*") if p.is_file()} == before
    assert main(["parity", str(run_copy), "--checkpoint", "student"]) == 0  # reads the earlier export
    assert main(["export", str(run_copy), "--overwrite"]) == 0
    assert sorted(p.name for p in export_folder.parent.iterdir()) == ["student", "teacher"]


def test_a_run_folder_given_as_text_reads_as_a_path(tmp_path):
    """`sparsebert run` named its run folder as text when it said what to serve, and the run ended
    with a TypeError after its gates had passed."""
    (tmp_path / "metrics.json").write_text('{"task": "rte"}')
    assert RunFolder(str(tmp_path)).metrics == {"task": "rte"} and RunFolder(str(tmp_path)).path == tmp_path
