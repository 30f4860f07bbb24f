"""Teacher-labelled augmentation: reproducible to the byte, labelled by the teacher, cached, and
fed to the student with the originals."""

import json
from pathlib import Path

from sparsebert import glue
from sparsebert.cli import main
from sparsebert.pipeline.augment import WORD, AugmentConfig, make_variants, neighbour_table, whole_words
from sparsebert.pipeline.data import read_jsonl


def _augment(run, out, seed):
    glue_dir = json.loads((run / "data" / "data.json").read_text())["source"]
    code = main(["augment", "--task", "rte", "--teacher", str(run / "teacher"), "--augment", "2",
                 "--limit", "12", "--seed", str(seed), "--out", str(out), "--glue-dir", glue_dir])
    assert code == 0
    return (out / "augmented.jsonl").read_bytes()


def test_same_seed_same_bytes_other_seed_other_text(trained_run, tmp_path):
    first = _augment(trained_run, tmp_path / "a", seed=1)
    assert _augment(trained_run, tmp_path / "b", seed=1) == first
    assert _augment(trained_run, tmp_path / "c", seed=2) != first
    variants = [json.loads(line) for line in first.decode().splitlines()]
    originals = read_jsonl(tmp_path / "a" / "data" / "train.json")
    assert len(variants) == 2 * len(originals) == 24
    assert {v["label"] for v in variants} <= {"entailment", "not_entailment"}  # the teacher's answers
    changed = [v for v in variants if v["sentence1"] != " ".join(WORD.findall(originals[v["source"]]["sentence1"]))]
    assert len(changed) > len(variants) / 2


def test_cached_by_its_inputs(trained_run, tmp_path, capsys):
    out = tmp_path / "a"
    _augment(trained_run, out, seed=1)
    written = (out / "augmented.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    _augment(trained_run, out, seed=1)
    assert "reusing" in capsys.readouterr().out
    assert (out / "augmented.jsonl").stat().st_mtime_ns == written
    _augment(trained_run, out, seed=3)  # another seed: made again
    assert json.loads((out / "augment.json").read_text())["key"]["seed"] == 3


def test_neighbours_are_other_whole_words(trained_run):
    from transformers import AutoTokenizer

    from sparsebert.pipeline.augment import word_embeddings

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "teacher")
    vocab = tokenizer.get_vocab()
    words = whole_words(tokenizer)
    table = neighbour_table(word_embeddings(trained_run / "teacher"), words, {vocab["film"], vocab["good"]}, k=5)
    inverse = {i: t for t, i in vocab.items()}
    for word in ("film", "good"):
        neighbours = [inverse[i] for i in table[vocab[word]]]
        assert len(neighbours) == 5 and word not in neighbours
        assert all(n.isalpha() and not n.startswith("##") for n in neighbours)


def test_variants_only_drop_or_swap_words(trained_run):
    from transformers import AutoTokenizer

    from sparsebert.pipeline.augment import word_embeddings

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "teacher")
    examples = [{"sentence1": "The film was good, and the actors were great.", "sentence2": "It was a good film."}]
    cfg = AugmentConfig(variants=20, seed=0, replace_probability=0.0, drop_probability=0.5)
    for variant in make_variants(examples, tokenizer, word_embeddings(trained_run / "teacher"), cfg, progress=False):
        kept = variant["sentence1"].split()
        assert len(kept) < 12 and set(kept) <= set("The film was good , and the actors were great .".split())


def test_student_data_is_originals_plus_variants(trained_run, tmp_path):
    from sparsebert.pipeline.stage import augmented_data
    from sparsebert.runfolder import RunFolder

    data = json.loads((trained_run / "data" / "data.json").read_text())
    folder = RunFolder(tmp_path / "run")
    folder.data_dir.mkdir(parents=True)
    student_data, info = augmented_data(glue.get_task("rte"), trained_run / "teacher", data, folder, 1, seed=5)
    rows = read_jsonl(Path(student_data["splits"]["train"]["path"]))
    originals = read_jsonl(Path(data["splits"]["train"]["path"]))
    assert len(rows) == 2 * len(originals) == info["student_train_examples"]
    assert rows[:len(originals)] == originals and all(set(r) == {"sentence1", "sentence2", "label"} for r in rows)
    assert student_data["splits"]["dev"] == data["splits"]["dev"]
