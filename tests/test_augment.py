"""Teacher-labelled augmentation: reproducible to the byte, labelled by the teacher, cached, and
fed to the student with the originals."""

import json
from pathlib import Path

from sparsebert import glue
from sparsebert.cli import main
from sparsebert.pipeline.augment import WORD, AugmentConfig, make_variants, neighbour_table, whole_words
from sparsebert.pipeline.data import read_jsonl


def _augment(run, out, seed, *extra):
    glue_dir = json.loads((run / "data" / "data.json").read_text())["source"]
    code = main(["augment", "--task", "rte", "--teacher", str(run / "teacher"), "--augment", "2",
                 "--limit", "12", "--seed", str(seed), "--out", str(out), "--glue-dir", glue_dir, *extra])
    assert code == 0
    return (out / f"augment-n2-s{seed}" / "augmented.jsonl").read_bytes()


def test_same_seed_same_bytes_other_seed_other_text(trained_run, tmp_path):
    first = _augment(trained_run, tmp_path / "a", seed=1)
    assert _augment(trained_run, tmp_path / "b", seed=1) == first
    assert _augment(trained_run, tmp_path / "a", 1, "--overwrite") == first  # made again, the same
    assert _augment(trained_run, tmp_path / "c", seed=2) != first
    variants = [json.loads(line) for line in first.decode().splitlines()]
    originals = read_jsonl(tmp_path / "a" / "data" / "train.json")
    assert len(variants) == 2 * len(originals) == 24
    assert {v["label"] for v in variants} <= {"entailment", "not_entailment"}  # the teacher's answers
    changed = [v for v in variants if v["sentence1"] != " ".join(WORD.findall(originals[v["source"]]["sentence1"]))]
    assert len(changed) > len(variants) / 2


def test_cached_by_every_input(trained_run, tmp_path, capsys):
    """Reused only when the teacher's files, the training file and the settings are the same."""
    import shutil

    from sparsebert.pipeline.augment import augment

    teacher = tmp_path / "teacher"
    shutil.copytree(trained_run / "teacher", teacher)
    train_file = tmp_path / "train.json"
    shutil.copyfile(trained_run / "data" / "train.json", train_file)
    task, cfg, out = glue.get_task("rte"), AugmentConfig(variants=1, seed=1), tmp_path / "cache"

    def made_again() -> bool:
        capsys.readouterr()
        augment(task, teacher, train_file, out, cfg)
        return "reusing" not in capsys.readouterr().out

    assert made_again()
    assert not made_again()
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "note": "another teacher"}))
    assert made_again()  # a teacher file changed
    train_file.write_text(train_file.read_text().splitlines()[0] + "\n")
    assert made_again()  # the training data changed
    assert len((out / "augmented.jsonl").read_text().splitlines()) == 1
    (out / "augmented.jsonl").write_text("")  # a file cut short
    assert made_again()


def test_augment_never_writes_over_an_earlier_result(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run / "data", run / "data")
    (run / "metrics.json").write_text("{}")
    before = (run / "data" / "dev.json").read_bytes()
    glue_dir = json.loads((trained_run / "data" / "data.json").read_text())["source"]
    args = ["augment", "--task", "rte", "--teacher", str(trained_run / "teacher"), "--augment", "1",
            "--limit", "5", "--out", str(run), "--glue-dir", glue_dir]
    assert main(args) == 2 and "already holds a result" in capsys.readouterr().err
    assert (run / "data" / "dev.json").read_bytes() == before
    assert main(args[:-4] + ["--limit", "0", "--out", str(tmp_path / "new"), "--glue-dir", glue_dir]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


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
    lengths = []
    for variant in make_variants(examples, tokenizer, word_embeddings(trained_run / "teacher"), cfg, progress=False):
        kept = variant["sentence1"].split()
        assert set(kept) <= set("The film was good , and the actors were great .".split())
        lengths.append(len(kept))
    assert min(lengths) < 11 and max(lengths) <= 11  # words were dropped, never added


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
