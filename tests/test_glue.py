"""GLUE reading (real files), label names, bad files, and the official metrics by hand."""

import numpy as np
import pytest

from sparsebert import glue

EXPECTED_DEV = {"sst2": 872, "cola": 1043, "mrpc": 408, "rte": 277, "stsb": 1500}


@pytest.mark.parametrize("task_name", sorted(EXPECTED_DEV))
def test_reads_real_task_with_label_names(glue_dir, task_name):
    task, splits = glue.load_task(task_name, glue_dir)
    assert len(splits["dev"]) == EXPECTED_DEV[task_name]
    example = splits["train"][0]
    assert example["sentence1"].strip()
    assert ("sentence2" in example) == (len(task.text_columns) == 2)
    labels = {e["label"] for e in splits["dev"]}
    if task.is_regression:
        assert all(0.0 <= v <= 5.0 for v in labels)
    else:
        assert labels == set(task.labels)  # real names, never 0/1


def test_mrpc_label_names_follow_quality_column(glue_dir):
    _, splits = glue.load_task("mrpc", glue_dir)
    first = (glue_dir / "MRPC" / "dev.tsv").read_text().splitlines()[1].split("\t")
    assert splits["dev"][0]["label"] == ("equivalent" if first[0] == "1" else "not_equivalent")
    assert splits["dev"][0]["sentence1"] == first[3]


def test_unknown_task():
    with pytest.raises(glue.DataError, match="unknown task 'qnlii'"):
        glue.get_task("qnlii")


def test_missing_folder(tmp_path):
    with pytest.raises(glue.DataError, match="no RTE/ folder"):
        glue.load_task("rte", tmp_path)


def test_malformed_row_names_file_and_line(tmp_path, glue_dir):
    (tmp_path / "RTE").mkdir()
    lines = (glue_dir / "RTE" / "dev.tsv").read_text().splitlines()
    (tmp_path / "RTE" / "train.tsv").write_text("\n".join(lines[:3] + ["17\tonly one column"]) + "\n")
    (tmp_path / "RTE" / "dev.tsv").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(glue.DataError, match=r"train.tsv:4: expected at least 4"):
        glue.load_task("rte", tmp_path)


def test_unknown_label(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t7\n")
    with pytest.raises(glue.DataError, match="label '7' is not one of"):
        glue.read_tsv(glue.get_task("sst2"), tmp_path / "SST-2" / "train.tsv")


def test_wrong_header(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\ttarget\ngood\t1\n")
    with pytest.raises(glue.DataError, match="header lacks column"):
        glue.read_tsv(glue.get_task("sst2"), path)


def test_accuracy_and_f1_by_hand():
    task = glue.get_task("mrpc")
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # tp=2 fp=1 fn=1 -> F1 = 4/6; 3 of 5 right.
    m = glue.compute_metrics(task, preds, refs)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["f1"] == pytest.approx(200 / 3)


def test_matthews_by_hand():
    task = glue.get_task("cola")
    preds, refs = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert glue.compute_metrics(task, preds, refs)["matthews"] == pytest.approx(100 / 3)


def test_pearson_spearman_by_hand():
    task = glue.get_task("stsb")
    refs = np.array([0.0, 1.0, 2.0, 3.0])
    m = glue.compute_metrics(task, 2 * refs + 1, refs)
    assert m["pearson"] == pytest.approx(100) and m["spearman"] == pytest.approx(100)
    m = glue.compute_metrics(task, [0.0, 1.0, 3.0, 2.0], refs)  # one swapped pair
    assert m["spearman"] == pytest.approx(80.0)
    assert m["pearson_spearman"] == pytest.approx((m["pearson"] + m["spearman"]) / 2)


def test_label_indices_use_task_order():
    task = glue.get_task("mrpc")
    assert list(glue.label_indices(task, ["equivalent", "not_equivalent"])) == [1, 0]
