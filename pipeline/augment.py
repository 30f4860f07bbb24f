"""Teacher-labelled data augmentation: more of the task's own text for the student to be
distilled on, which recovers much of what high sparsity costs on small GLUE tasks.

Each training example gets N variants. In each, every word is, independently, dropped (with
``drop_probability``), or replaced (``replace_probability``) by one of its nearest neighbours in
the teacher's own input-embedding space (cosine similarity, whole-word vocabulary entries
only), or kept. The teacher then labels every variant (its predicted label, or its value for a
regression): the student learns the teacher's function on text it would not otherwise see.

Reproducible: each example's variants come from a generator seeded with (seed, example index),
and the teacher labels them in fp32 on the CPU (a GPU's kernels may round differently), so the
same inputs and seed give the same bytes. At the recipe's default ``hardness: 1`` the student
learns from the teacher's logits on each variant, not from the label written beside it (which the
hard-label loss, ``hardness < 1``, and OBS's gradient sampler use); a replacement may well be an
antonym (good -> bad), which is why the teacher, not the original label, answers for it.
Written as JSON lines (``sentence1``, ``sentence2``, ``label``, ``source``: the example's index),
with ``augment.json`` beside it saying what made it (the cache key).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sparsebert import atomic, checkpoint, glue
from sparsebert.errors import UserError

WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class AugmentConfig:
    variants: int  # per training example
    seed: int = 42
    replace_probability: float = 0.3
    drop_probability: float = 0.1
    neighbours: int = 8  # a replacement is drawn from this many nearest words

    def __post_init__(self):
        if self.variants < 1:
            raise UserError(f"--augment must be at least 1 variant per example, not {self.variants}")
        if not 0 <= self.replace_probability + self.drop_probability <= 1:
            raise UserError("replace and drop probabilities must add up to at most 1")


def word_embeddings(model_dir: Path) -> np.ndarray:
    matrices = [w for name, w in checkpoint.load_weights(model_dir).items() if name.endswith("word_embeddings.weight")]
    if len(matrices) != 1:
        raise UserError(f"{model_dir}: expected one word-embedding matrix, found {len(matrices)}")
    return matrices[0].astype(np.float32)


def whole_words(tokenizer) -> list[int]:
    """Vocabulary ids that are whole alphabetic words (no ``##`` pieces, specials, ``[unused]``)."""
    return sorted(i for token, i in tokenizer.get_vocab().items() if token.isalpha() and len(token) > 1)


def neighbour_table(embeddings: np.ndarray, candidates: list[int], wanted: set[int], k: int,
                    chunk: int = 1024) -> dict[int, list[int]]:
    """The ``k`` nearest whole words (cosine) of each id in ``wanted``, computed in chunks so the
    vocabulary-by-vocabulary similarity matrix is never held at once."""
    pool = np.asarray(candidates)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    queries = sorted(wanted & set(candidates))
    table = {}
    for start in range(0, len(queries), chunk):
        ids = queries[start:start + chunk]
        similarity = unit[ids] @ unit[pool].T
        similarity[np.arange(len(ids)), np.searchsorted(pool, ids)] = -np.inf  # not itself
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        table.update({i: pool[row].tolist() for i, row in zip(ids, nearest)})
    return table


def vary(text: str, rng: random.Random, vocab: dict[str, int], inverse: dict[int, str],
         table: dict[int, list[int]], cfg: AugmentConfig) -> str:
    """One variant of ``text``: words dropped or replaced by an embedding neighbour."""
    words = WORD.findall(text)
    out = []
    for word in words:
        draw = rng.random()
        if word.isalpha() and draw < cfg.drop_probability:
            continue
        token = vocab.get(word.lower())
        if token in table and draw < cfg.drop_probability + cfg.replace_probability:
            word = inverse[rng.choice(table[token])]
        out.append(word)
    return " ".join(out) or text


def make_variants(examples: list[dict], tokenizer, embeddings: np.ndarray, cfg: AugmentConfig,
                  progress: bool = True) -> list[dict]:
    vocab = tokenizer.get_vocab()
    inverse = {i: token for token, i in vocab.items()}
    columns = [c for c in ("sentence1", "sentence2") if examples and c in examples[0]]
    seen = {vocab[w.lower()] for e in examples for c in columns for w in WORD.findall(e[c]) if w.lower() in vocab}
    table = neighbour_table(embeddings, whole_words(tokenizer), seen, cfg.neighbours)
    variants = []
    for index, example in enumerate(_bar(examples, "augmenting", progress)):
        rng = random.Random(f"{cfg.seed}-{index}")
        for _ in range(cfg.variants):
            variant = {c: vary(example[c], rng, vocab, inverse, table, cfg) for c in columns}
            variants.append({**variant, "source": index})
    return variants


def teacher_labels(task: glue.GlueTask, teacher: Path, variants: list[dict]) -> list:
    """The teacher's answer for every variant: its label name, or its value for a regression."""
    from transformers import AutoConfig

    from sparsebert.inference import torch_logits

    logits = torch_logits(teacher, variants, device="cpu", progress="teacher labelling")
    if task.is_regression:
        return [round(float(v), 6) for v in logits[:, 0]]
    id2label = {int(k): v for k, v in AutoConfig.from_pretrained(teacher).id2label.items()}
    return [id2label[int(i)] for i in logits.argmax(axis=1)]


FORMAT = 1  # bump when the way variants are made changes: older files are then made again
_TEACHER_FILES = (*checkpoint.WEIGHT_FILES, "config.json", "tokenizer.json", "vocab.txt",
                  "tokenizer_config.json", "special_tokens_map.json")


def cache_key(task: glue.GlueTask, teacher: Path, train_file: Path, cfg: AugmentConfig) -> dict:
    """What the augmented file depends on: the task, every file the teacher is loaded from and
    the training file (by content), the settings, and this module's format."""
    digest = hashlib.sha256()
    files = sorted(p for pattern in _TEACHER_FILES for p in Path(teacher).glob(pattern))
    for path in [*files, Path(train_file)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"format": FORMAT, "task": task.name, "inputs_sha256": digest.hexdigest(), **asdict(cfg)}


def augment(task: glue.GlueTask, teacher: Path, train_file: Path, out_dir: Path, cfg: AugmentConfig) -> Path:
    """``out_dir/augmented.jsonl`` for the examples in ``train_file``, reused when it was made
    from the same inputs and settings; return its path."""
    from transformers import AutoTokenizer

    from sparsebert.pipeline.data import read_jsonl, write_jsonl

    out_dir = Path(out_dir)
    path, meta_path = out_dir / "augmented.jsonl", out_dir / "augment.json"
    key = cache_key(task, teacher, train_file, cfg)
    if _cached(path, meta_path, key):
        print(f"[sparsebert] reusing {path} (same teacher, data and settings)", flush=True)
        return path
    examples = read_jsonl(Path(train_file))
    if not examples:
        raise UserError(f"{train_file} has no examples to augment")
    variants = make_variants(examples, AutoTokenizer.from_pretrained(teacher), word_embeddings(teacher), cfg)
    for variant, label in zip(variants, teacher_labels(task, Path(teacher), variants)):
        variant["label"] = label
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the key is written last: it vouches only for a whole file
    write_jsonl(variants, path)
    atomic.write_json(meta_path, {"key": key, "examples": len(examples), "variants": len(variants)}, indent=2)
    return path


def _cached(path: Path, meta_path: Path, key: dict) -> bool:
    if not (path.is_file() and meta_path.is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    return meta.get("key") == key and meta.get("variants") == lines


def _bar(items, description: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="example")
