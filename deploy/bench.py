"""Latency benchmark: sparse and dense models side by side on DeepSparse, ONNX Runtime and
PyTorch, at batch 1 and a larger batch, sequence length 128, in one run, so that the ratios
(not the absolute times) say what sparsity buys on this machine.

Writes ``bench.json``, ``bench.md`` (a table) and ``bench.png`` (a plot).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsebert.deploy.engines import ENGINES, Runner


@dataclass
class Model:
    family: str  # e.g. "all-MiniLM-L6-v2 (rte)" or "BERT-base (random weights)"
    variant: str  # "dense" or "sparse 95%"
    model_dir: Path
    deployment: Path


def random_inputs(input_names: list[str], batch_size: int, sequence_length: int, vocab_size: int = 30522,
                  seed: int = 0) -> dict:
    """Full-length rows (attention mask all ones, one segment): the cost of a real 128-token input."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, sequence_length)
    filled = {"input_ids": rng.integers(1000, vocab_size, shape, dtype=np.int64),
              "attention_mask": np.ones(shape, dtype=np.int64)}
    return {name: filled.get(name, np.zeros(shape, dtype=np.int64)) for name in input_names}


def time_runner(runner: Runner, seconds: float, min_iterations: int = 3) -> dict:
    """Items per second and per-batch latency percentiles over about ``seconds`` of calls."""
    inputs = random_inputs(runner.input_names, runner.batch_size, runner.sequence_length)
    runner(inputs)  # warm-up (first-call allocation, kernel selection)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_iterations or time.perf_counter() < deadline:
        start = time.perf_counter()
        runner(inputs)
        times.append(time.perf_counter() - start)
    times_ms = np.array(times) * 1000
    return {"items_per_second": runner.batch_size * len(times) / float(np.sum(times)),
            "p50_ms": float(np.percentile(times_ms, 50)), "p99_ms": float(np.percentile(times_ms, 99)),
            "iterations": len(times)}


def benchmark(models: list[Model], batch_sizes: list[int], sequence_length: int = 128,
              seconds: float = 5.0, engines=ENGINES, threads: int | None = None,
              progress=print) -> dict:
    rows = []
    for model in models:
        for engine in engines:
            for batch_size in batch_sizes:
                runner = Runner(engine, model.model_dir, model.deployment, batch_size, sequence_length,
                                threads)
                try:
                    result = time_runner(runner, seconds)
                finally:
                    runner.close()
                rows.append({"family": model.family, "variant": model.variant, "engine": engine,
                             "batch_size": batch_size, **result})
                progress(f"  {model.family:32} {model.variant:11} {engine:12} batch {batch_size:3}: "
                         f"{result['items_per_second']:8.1f} items/s  p50 {result['p50_ms']:8.1f} ms")
    return {"sequence_length": sequence_length, "seconds_per_measurement": seconds,
            "threads": threads or "all",
            "machine": machine(), "rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    """Speed-ups of each sparse variant over the dense model of its family, per batch size."""
    def speed(family, variant, engine, batch):
        return next((r["items_per_second"] for r in rows if (r["family"], r["variant"], r["engine"], r["batch_size"])
                     == (family, variant, engine, batch)), None)

    out = []
    for family, variant in dict.fromkeys((r["family"], r["variant"]) for r in rows):
        if variant == "dense":
            continue
        for batch in sorted({r["batch_size"] for r in rows}):
            sparse_ds = speed(family, variant, "deepsparse", batch)
            pairs = {
                "sparse_deepsparse_vs_dense_onnxruntime": (sparse_ds, speed(family, "dense", "onnxruntime", batch)),
                "sparse_vs_dense_deepsparse": (sparse_ds, speed(family, "dense", "deepsparse", batch)),
                "sparse_deepsparse_vs_dense_pytorch": (sparse_ds, speed(family, "dense", "pytorch", batch)),
                "sparse_vs_dense_onnxruntime": (speed(family, variant, "onnxruntime", batch),
                                                speed(family, "dense", "onnxruntime", batch)),
            }
            out.append({"family": family, "variant": variant, "batch_size": batch,
                        **{k: a / b for k, (a, b) in pairs.items() if a and b}})
    return out


def machine() -> dict:
    from sparsebert import hardware

    return hardware.describe()


def markdown(report: dict) -> str:
    lines = [f"Sequence length {report['sequence_length']}, {report['machine']['cpus']} CPUs "
             f"({report['machine'].get('cpu') or report['machine'].get('processor')}), {report.get('threads', 'all')} thread(s) "
             "per engine; items/s (p50 ms per batch).", "",
             "| model | variant | batch | " + " | ".join(ENGINES) + " |",
             "|---|---|---|" + "---|" * len(ENGINES)]
    keys = dict.fromkeys((r["family"], r["variant"], r["batch_size"]) for r in report["rows"])
    for family, variant, batch in keys:
        cells = []
        for engine in ENGINES:
            r = next((r for r in report["rows"] if (r["family"], r["variant"], r["batch_size"], r["engine"])
                      == (family, variant, batch, engine)), None)
            cells.append(f"{r['items_per_second']:.1f} ({r['p50_ms']:.1f})" if r else "-")
        lines.append(f"| {family} | {variant} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "| model | variant | batch | sparse DS / dense ORT | sparse / dense (DS) | sparse DS / dense PyTorch | sparse / dense (ORT) |",
              "|---|---|---|---|---|---|---|"]
    for r in report["ratios"]:
        cells = [f"{r[k]:.2f}x" if k in r else "-" for k in (
            "sparse_deepsparse_vs_dense_onnxruntime", "sparse_vs_dense_deepsparse",
            "sparse_deepsparse_vs_dense_pytorch", "sparse_vs_dense_onnxruntime")]
        lines.append(f"| {r['family']} | {r['variant']} | {r['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in report["rows"]))
    batches = sorted({r["batch_size"] for r in report["rows"]})
    fig, axes = plt.subplots(len(families), len(batches), figsize=(5 * len(batches), 3.6 * len(families)),
                             squeeze=False)
    for i, family in enumerate(families):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            rows = [r for r in report["rows"] if r["family"] == family and r["batch_size"] == batch]
            variants = list(dict.fromkeys(r["variant"] for r in rows))
            width = 0.8 / len(variants)
            for k, variant in enumerate(variants):
                values = [next((r["items_per_second"] for r in rows if r["variant"] == variant
                                and r["engine"] == e), 0) for e in ENGINES]
                ax.bar(np.arange(len(ENGINES)) + k * width, values, width, label=variant)
            ax.set_xticks(np.arange(len(ENGINES)) + width * (len(variants) - 1) / 2, ENGINES)
            ax.set_title(f"{family}, batch {batch}", fontsize=10)
            ax.set_ylabel("items / s (higher is better)")
            ax.legend(fontsize=8)
    fig.suptitle(f"seq {report['sequence_length']}, {report['machine']['cpus']} CPUs, "
                 f"{report.get('threads', 'all')} thread(s) per engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench.md").write_text(markdown(report))
    plot(report, out_dir / "bench.png")


def bert_base_models(cache: Path, sparsities: list[float], sequence_length: int = 128) -> list[Model]:
    """A BERT-base-sized classifier with random weights, dense and magnitude-pruned per matrix
    to each of ``sparsities`` (speed depends on where the zeros are, not on the values), built
    and exported once into ``cache``."""
    from sparsebert.deploy.export import export

    models = []
    for target in [0.0, *sparsities]:
        variant = "dense" if target == 0 else f"sparse {target:.0%}"
        folder = cache / ("dense" if target == 0 else f"sparse{round(target * 100)}")
        if not (folder / "deployment" / "model.onnx").is_file():
            _random_bert_base(folder / "checkpoint", target)
            export(folder / "checkpoint", folder, sequence_length)
        models.append(Model("BERT-base (random weights)", variant, folder / "checkpoint", folder / "deployment"))
    return models


def _random_bert_base(folder: Path, sparsity: float) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparsebert.models import embedded_default
    from sparsebert.pipeline.report import is_pruned, pruned_patterns

    torch.manual_seed(0)
    config = BertConfig(num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config).eval()
    patterns = pruned_patterns()  # the matrices the shipped recipe prunes
    with torch.no_grad():
        for name, param in model.named_parameters():
            if sparsity and is_pruned(name, patterns):
                k = int(param.numel() * sparsity)
                threshold = param.abs().flatten().kthvalue(k).values
                param.mul_(param.abs() > threshold)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_default()).save_pretrained(folder)  # same uncased vocab
