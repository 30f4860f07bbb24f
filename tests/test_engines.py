"""One engine table (deploy/engines.py): an engine added there, and nowhere else, is a CLI
choice, is timed by the benchmark with its own column and ratio, and is run by parity; what it
runs (INT8, dense models) and whether it serves come from the same row."""

from pathlib import Path

import pytest
import yaml
from tiny import tiny_task_checkpoint

from sparsebert import glue
from sparsebert.cli import build_parser
from sparsebert.deploy import bench, engines, parity, thresholds
from sparsebert.deploy.export import export
from sparsebert.deploy.serve import ServeSettings

LENGTH = 32


@pytest.fixture(scope="module")
def deployed(glue_dir, tmp_path_factory):
    task = glue.get_task("rte")
    folder = tmp_path_factory.mktemp("engines")
    checkpoint = tiny_task_checkpoint(task, folder / "checkpoint")
    _, splits = glue.load_task(task.name, str(glue_dir))
    return task, checkpoint, export(checkpoint, folder, sequence_length=LENGTH), splits["dev"][:12]


@pytest.fixture
def fake(monkeypatch):
    """A sparse engine (ONNX Runtime underneath, so its logits are PyTorch's), added in one place."""
    loads = []

    def load(model_dir, deployment, batch_size, sequence_length, input_names, threads):
        loads.append((batch_size, sequence_length))
        return engines.OnnxRuntimeBackend(model_dir, deployment, batch_size, sequence_length, input_names, threads)

    monkeypatch.setitem(engines.TABLE, "fake", engines.Engine(
        "fake", "a test engine", load, int8=None, exploits_sparsity=True, needs_sparse_model=True,
        serves_as="onnxruntime", label="Fake"))
    return loads


def test_an_engine_added_to_the_table_reaches_the_cli_bench_and_parity(deployed, fake):
    task, checkpoint, deployment, examples = deployed
    parser = build_parser()
    names = ["pytorch", "onnxruntime", "deepsparse", "onnxruntime-sparse", "pytorch-csr", "fake"]
    assert parser.parse_args(["bench", "run"]).engines == names
    assert parser.parse_args(["serve", "run", "--engine", "fake"]).engine == "fake"
    assert ServeSettings(engine="fake").engine == "fake" and "fake" in engines.served_engines()  # real-text default

    models = [bench.Model("tiny (rte)", "dense", checkpoint, deployment),
              bench.Model("tiny (rte)", "sparse 90%", checkpoint, deployment)]
    report = bench.benchmark(models, [1], sequence_length=LENGTH, seconds=0.0, threads=[1], progress=lambda line: None)
    assert {r["variant"] for r in report["rows"] if r["engine"] == "fake"} == {"sparse 90%"}  # needs a sparse model
    assert fake == [(1, LENGTH)]  # the Runner built it through the table
    (ratios,) = report["ratios"]
    assert ratios["sparse_fake_vs_dense_onnxruntime"] > 0  # a sparse engine is held to the dense baseline
    assert ratios["sparse_deepsparse_vs_dense_onnxruntime"] > 0  # the existing keys are unchanged
    text = bench.markdown(report)
    assert "| pytorch | onnxruntime | deepsparse | onnxruntime-sparse | pytorch-csr | fake |" in text
    assert "| sparse ORT-sparse / dense ORT | sparse PyTorch-CSR / dense ORT | sparse Fake / dense ORT |" in text

    limits = thresholds.load()["parity"]
    report = parity.parity(task, checkpoint, deployment, {"dev": examples}, limits, batch_size=4,
                           sequence_length=LENGTH)
    (split,) = report["splits"].values()
    assert list(split["metrics"]) == names
    assert split["against_pytorch"]["fake"]["max_logit_difference"] < 1e-3 and report["passed"]
    assert "fake" in parity.table(report)


def test_bench_times_every_thread_setting_it_is_given(deployed):
    """`--threads 1 all` is one pass per setting, fixed-length and real-text rows alike, and each
    ratio compares rows of the same setting (tiny model; tests/test_deploy.py times the real one at
    one thread)."""
    _, checkpoint, deployment, examples = deployed
    assert build_parser().parse_args(["bench", "run", "--threads", "1", "all"]).threads == [1, "all"]
    models = [bench.Model("tiny (rte)", "dense", checkpoint, deployment),
              bench.Model("tiny (rte)", "sparse 90%", checkpoint, deployment)]
    report = bench.benchmark(models, [1], sequence_length=LENGTH, seconds=0.0, engines=["onnxruntime", "deepsparse"],
                             threads=[1, "all"], progress=lambda line: None)
    assert {(r["engine"], r["variant"], r["threads"]) for r in report["rows"]} == {
        (e, v, t) for e in ("onnxruntime", "deepsparse") for v in ("dense", "sparse 90%") for t in (1, "all")}
    assert [r["threads"] for r in report["ratios"]] == [1, "all"]
    assert all(r["sparse_deepsparse_vs_dense_onnxruntime"] > 0 for r in report["ratios"])
    real = bench.real_text_benchmark(models, examples, [16, LENGTH], seconds=0.0, engines=["onnxruntime"],
                                     threads=[1, "all"], progress=lambda line: None)
    assert {(r["input"], r["threads"]) for r in real["rows"]} == {
        (i, t) for i in ("padded", "bucketed") for t in (1, "all")}


def test_a_served_engine_is_served_by_the_pipeline_its_row_names(deployed, fake, tmp_path):
    """`serves_as` is what deepsparse.server's config gets as the pipeline's engine_type, so a row
    that says it serves does: the fake engine answers over HTTP as ONNX Runtime does."""
    from sparsebert.deploy.local import local_server
    from sparsebert.deploy.serve import DeploymentError, prepare

    _, _, deployment, examples = deployed
    config = yaml.safe_load(prepare(deployment, tmp_path / "config", ServeSettings(engine="fake")).read_text())
    assert config["endpoints"][0]["kwargs"] == {"engine_type": "onnxruntime"}
    pairs = [[e["sentence1"], e["sentence2"]] for e in examples]
    answers = {}
    for engine in ("fake", "onnxruntime"):
        with local_server(deployment, engine, tmp_path / engine, name=engine) as client:
            answers[engine] = client.classify(pairs)
    assert answers["fake"].labels == answers["onnxruntime"].labels and len(answers["fake"].labels) == len(pairs)
    assert answers["fake"].scores == pytest.approx(answers["onnxruntime"].scores, abs=1e-6)
    with pytest.raises(DeploymentError, match="unknown engine 'pytorch-csr'"):
        ServeSettings(engine="pytorch-csr")  # its row serves nothing
    with pytest.raises(ValueError, match="'pytorch-csr' is not served"):
        engines.pipeline_engine_type("pytorch-csr")


def test_capabilities_come_from_the_table(fake):
    """INT8 is timed on native integer kernels only (PyTorch emulates it: parity's reference, never
    timed), an FP32-only engine runs no INT8 model, and a sparse engine is not timed on a dense one."""
    int8 = bench.Model("m", "sparse 90% INT8", None, None, precision="int8")
    dense = bench.Model("m", "dense", None, None)
    assert bench.timed_on(int8, engines.engine_names()) == ["onnxruntime", "deepsparse"]
    assert bench.timed_on(dense, engines.engine_names()) == ["pytorch", "onnxruntime", "deepsparse"]
    assert engines.engines_for(int8=True) == ["pytorch", "onnxruntime", "deepsparse"]
    assert engines.served_engines(int8=True) == ("onnxruntime", "deepsparse")  # served parity of an INT8 graph
    assert engines.engines_for(int8=False) == list(engines.engine_names())


def test_ratio_columns_keep_the_keys_the_speed_floors_name():
    suffixes = [suffix for _, _, suffix, _ in engines.ratio_columns()]
    assert set(suffixes) == {"vs_dense_onnxruntime", "deepsparse_vs_dense_onnxruntime", "vs_dense_deepsparse",
                             "deepsparse_vs_dense_pytorch", "onnxruntime_sparse_vs_dense_onnxruntime",
                             "pytorch_csr_vs_dense_onnxruntime"}
    floors = [k.removeprefix("min_") for k in thresholds.load()["speed"] if k.startswith("min_")]
    assert floors and all(f.removeprefix("sparse_int8_").removeprefix("sparse_") in suffixes for f in floors)


def test_int8_on_a_cpu_that_emulates_it_is_said(monkeypatch, capsys, tmp_path):
    """DeepSparse runs INT8 natively with AVX512-VNNI or AMX only; serving the INT8 student on an
    AVX2 CPU says it is the slower one there (and says nothing where INT8 is native)."""
    from sparsebert import cli, hardware
    from sparsebert.deploy import serve

    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")  # the note is for x86 CPUs
    assert hardware.native_int8({"avx2", "avx512_vnni"}) and hardware.native_int8({"amx_int8"})
    assert not hardware.native_int8({"avx2", "avx512f"}) and hardware.int8_note({"avx2"}) is not None
    assert hardware.int8_note({"avx512_vnni"}) is None
    served = []
    monkeypatch.setattr(serve, "main", lambda argv: served.append(argv) or 0)
    monkeypatch.setattr(cli, "RunFolder", lambda path: type("Run", (), {
        "task": glue.get_task("rte"), "deployment": lambda self, which: tmp_path / which})())
    for flags, said in [({"avx2"}, True), ({"avx2", "avx512_vnni"}, False)]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert cli.main(["serve", str(tmp_path), "--checkpoint", "student-int8"]) == 0
        assert ("emulates INT8" in capsys.readouterr().err) == said
    assert served[-1][0] == str(tmp_path / "student-int8")  # served as asked


def test_serve_picks_int8_only_where_it_runs_natively_and_is_exported(monkeypatch, capsys, tmp_path):
    """With no --checkpoint, serve picks the INT8 student where the run has one, exported, and the CPU
    runs INT8 natively (AVX512-VNNI or AMX); elsewhere (DeepSparse emulates INT8 on AVX2 alone), or
    when the INT8 export is missing, the FP32 student, and it says why."""
    from sparsebert import cli, hardware
    from sparsebert.deploy import serve

    served = []
    monkeypatch.setattr(serve, "main", lambda argv: served.append(argv) or 0)
    cases = [({"avx2"}, True, True, "deepsparse", "student", "no AVX512-VNNI or AMX"),
             ({"avx2"}, True, True, "onnxruntime", "student", "no AVX512-VNNI or AMX"),
             ({"avx2", "avx512_vnni"}, True, True, "deepsparse", "student-int8", "runs natively"),
             ({"amx_int8"}, True, True, "onnxruntime", "student-int8", "runs natively"),
             ({"avx2", "avx512_vnni"}, True, False, "deepsparse", "student", "no exported INT8 student"),
             ({"avx2", "avx512_vnni"}, False, False, "deepsparse", "student", "no exported INT8 student")]
    for flags, trained, exported, engine, expected, why in cases:
        run = tmp_path / f"run-{len(served)}"
        if exported:
            (run / "export" / "student-int8" / "deployment").mkdir(parents=True)
            (run / "export" / "student-int8" / "deployment" / "model.onnx").write_bytes(b"")
        checkpoints = ["student", "teacher", *(["student-int8"] if trained else [])]
        monkeypatch.setattr(cli, "RunFolder", lambda path, run=run, checkpoints=checkpoints: type("Run", (), {
            "path": Path(path), "task": glue.get_task("rte"), "checkpoints": checkpoints,
            "metrics": {"int8_cost_points": 0.19} if trained else {},
            "export_dir": lambda self, which: run / "export" / which,
            "deployment": lambda self, which: run / which})())
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert cli.main(["serve", str(run), "--engine", engine]) == 0
        assert served[-1][0] == str(run / expected), (flags, trained, exported, engine)
        said = capsys.readouterr().err
        assert f"serving {run}'s {expected} on {engine}" in said and why in said, said
        assert ("0.19 points below" in said) == (expected == "student-int8")


def test_an_int8_student_that_scores_higher_is_said_to(monkeypatch, tmp_path):
    from sparsebert import cli, hardware

    (tmp_path / "export" / "student-int8" / "deployment").mkdir(parents=True)
    (tmp_path / "export" / "student-int8" / "deployment" / "model.onnx").write_bytes(b"")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    run = type("Run", (), {"checkpoints": ["student", "student-int8"], "metrics": {"int8_cost_points": -0.11},
                           "export_dir": lambda self, which: tmp_path / "export" / which})()
    which, why = cli.served_checkpoint(run, "deepsparse")
    assert which == "student-int8" and "0.11 points above the FP32 student" in why, why
    # An engine without INT8 kernels serves the FP32 student, whatever the CPU.
    assert cli.served_checkpoint(run, "onnxruntime-sparse") == ("student", "onnxruntime-sparse runs FP32 models")


def test_bench_says_which_isa_deepsparse_ran_on(monkeypatch):
    """The bench's header names DeepSparse's ISA and whether its INT8 is native, from DeepSparse's own
    detection (NM_ARCH overrides it)."""
    from sparsebert import hardware
    from sparsebert.deploy import bench

    monkeypatch.setenv("NM_ARCH", "avx2")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    report = {"machine": bench.machine(), "sequence_length": 128, "threads": [1], "rows": [], "ratios": []}
    assert report["machine"]["deepsparse_isa"] == "avx2, INT8 emulated"
    assert "DeepSparse on avx2, INT8 emulated" in bench.machine_line(report)


def test_run_ends_naming_the_model_to_serve(monkeypatch, tmp_path, capsys):
    """`sparsebert run`'s last line names what `serve` would serve (its stages stubbed here: each
    is tested on its own); it once failed there, after its gates, on a run folder named as text."""
    from sparsebert import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"task": "rte"}')
    monkeypatch.setattr(cli, "cmd_train", lambda args: 0)
    for stage in ("export", "parity", "bench"):
        monkeypatch.setitem(cli.COMMANDS, stage, lambda args: 0)
    monkeypatch.setattr(cli, "_judge", lambda args: [])
    assert cli.main(["run", "--task", "rte", "--out", str(run)]) == 0
    assert f"serve it: sparsebert serve {run}  (the student on DeepSparse: the run has no exported INT8" \
        in capsys.readouterr().out


def test_runners_leave_no_copy_of_the_model_behind_and_still_answer(deployed, tmp_path, monkeypatch):
    """DeepSparse and a reshaped ONNX Runtime load a private copy of model.onnx; it goes once the
    engine stands (a kept copy per runner filled CI's disk during the real-text benchmark)."""
    import tempfile

    import numpy as np

    from sparsebert import inference
    from transformers import AutoTokenizer

    task, checkpoint, deployment, examples = deployed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    names = inference.onnx_input_names(deployment / "model.onnx")
    tokenizer = AutoTokenizer.from_pretrained(deployment)
    for length in (LENGTH, 16):  # 16: a bucket the graph was not exported at, run on a copy
        batch = inference.encode(tokenizer, examples[:2], names, length, fixed_length=True)
        reference = engines.Runner("pytorch", checkpoint, deployment, 2, length)(batch)
        for engine in ("onnxruntime", "deepsparse"):
            runner = engines.Runner(engine, checkpoint, deployment, 2, length)
            assert list(tmp_path.iterdir()) == [], f"{engine} at length {length} left its copy"
            np.testing.assert_allclose(runner(batch), reference, atol=1e-3)
            runner.close()
