"""Latency benchmark: dense, sparse and sparse-INT8 models side by side on DeepSparse, ONNX
Runtime and PyTorch, so that the ratios (not the absolute times) say what sparsity and INT8 buy
on this machine.

Two kinds of input:
- fixed: random full rows of the exported length (128 tokens), at batch 1 and a larger batch;
- real text (``--real-text``): a task's dev texts at batch 1, each its own length, either padded
  to the exported length (what a fixed-shape server does) or run on the smallest of a few
  sequence-length buckets that holds it (what the sparsebert server does).

Every measurement of one family (its dense, sparse and INT8 models on every engine) is taken in
rounds, round-robin, so that a machine that slows down or speeds up during the run (turbo,
a noisy neighbour) affects each of them alike; measuring model after model put every dense
figure before every sparse one and skewed the ratios by up to 25% on a 2-core VM.

Writes ``bench.json``, ``bench.md`` (tables) and ``bench.png`` (a plot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsebert import atomic, flops
from sparsebert.deploy.engines import Runner, engine_names, engines_for, ratio_columns, served_engines
from sparsebert.inference import onnx_input_names

ROUNDS = 3


@dataclass
class Model:
    family: str  # e.g. "all-MiniLM-L6-v2 (rte)" or "BERT-base (random weights)"
    variant: str  # "dense", "sparse 95%" or "sparse 95% INT8"
    model_dir: Path
    deployment: Path
    precision: str = "fp32"  # "int8": PyTorch only emulates it (fake quantization), so it is not timed there


def timed_on(model: Model, engines) -> list[str]:
    """The ``engines`` whose figures on ``model`` are their own (see engines.engines_for)."""
    return engines_for(model.precision == "int8", model.variant != "dense", timed=True, among=engines)


def random_inputs(input_names: list[str], batch_size: int, sequence_length: int, vocab_size: int = 30522,
                  seed: int = 0) -> dict:
    """Full-length rows (attention mask all ones, one segment): the cost of a real 128-token input."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, sequence_length)
    filled = {"input_ids": rng.integers(1000, vocab_size, shape, dtype=np.int64),
              "attention_mask": np.ones(shape, dtype=np.int64)}
    return {name: filled.get(name, np.zeros(shape, dtype=np.int64)) for name in input_names}


class Timed:
    """One measured configuration: a call that runs one unit of work, and its timings.
    ``calls_per_pass``: each turn makes whole passes (every real-text request once), so that
    every configuration times the same mix of lengths; ``warm`` readies every runner."""

    def __init__(self, key: dict, call, items_per_call: int, close=lambda: None, calls_per_pass: int = 1,
                 warm=None):
        self.key, self.call, self.items_per_call, self.close = key, call, items_per_call, close
        self.calls_per_pass, self.warm = calls_per_pass, warm or call
        self.times: list[float] = []

    def run_for(self, seconds: float, min_calls: int = 1) -> None:
        deadline = time.perf_counter() + seconds
        calls = 0
        while calls < min_calls or calls % self.calls_per_pass or time.perf_counter() < deadline:
            start = time.perf_counter()
            self.call()
            self.times.append(time.perf_counter() - start)
            calls += 1

    def result(self) -> dict:
        times_ms = np.array(self.times) * 1000
        return {**self.key, "items_per_second": self.items_per_call * len(self.times) / float(np.sum(self.times)),
                "p50_ms": float(np.percentile(times_ms, 50)), "p99_ms": float(np.percentile(times_ms, 99)),
                "iterations": len(self.times)}


def measure_interleaved(timed: list[Timed], seconds: float, rounds: int = ROUNDS, progress=print) -> list[dict]:
    """``seconds`` of calls for each, split into ``rounds`` round-robin turns; closes them all."""
    try:
        for t in timed:
            t.warm()  # warm-up (first-call allocation, kernel selection)
        for _ in range(rounds):
            for t in timed:
                t.run_for(seconds / rounds, min_calls=1)
        results = [t.result() for t in timed]
    finally:
        for t in timed:
            t.close()
    for r in results:
        progress(f"  {r['family']:32} {r['variant']:16} {r['engine']:12} {r.get('input', ''):10} batch "
                 f"{r['batch_size']:3}, {r['threads']} thread(s): {r['items_per_second']:8.1f} items/s  "
                 f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms")
    return results


def _fixed_timed(model: Model, engine: str, batch_size: int, sequence_length: int, threads) -> Timed:
    runner = Runner(engine, model.model_dir, model.deployment, batch_size, sequence_length,
                    None if threads == "all" else threads)
    inputs = random_inputs(runner.input_names, batch_size, sequence_length)
    key = {"family": model.family, "variant": model.variant, "precision": model.precision, "engine": engine,
           "input": "fixed", "batch_size": batch_size, "threads": threads}
    return Timed(key, lambda: runner(inputs), batch_size, runner.close)


def benchmark(models: list[Model], batch_sizes: list[int], sequence_length: int = 128,
              seconds: float = 5.0, engines=None, threads: list | None = None,
              progress=print) -> dict:
    """Fixed-length rows: every model of a family on every engine (default: the table's), at each
    batch size and each thread count (an int, or "all" for each library's default), measured
    interleaved."""
    threads, engines = threads or ["all"], engines or engine_names()
    # Read first: a checkpoint the bound cannot be measured on stops the bench before its minutes.
    bounds = {(m.family, m.variant): flops.bound_for(m.model_dir, sequence_length) for m in models
              if m.variant != "dense"}
    rows = []
    for count in threads:
        for family in dict.fromkeys(m.family for m in models):
            for batch_size in batch_sizes:
                timed = [_fixed_timed(m, e, batch_size, sequence_length, count)
                         for m in models if m.family == family for e in timed_on(m, engines)]
                rows += measure_interleaved(timed, seconds, progress=progress)
    return {"sequence_length": sequence_length, "seconds_per_measurement": seconds, "rounds": ROUNDS,
            "threads": threads, "machine": machine(), "rows": rows, "ratios": ratios(rows, bounds)}


# ---------------------------------------------------------------- real text


def bucket_of(length: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``length`` tokens (the longest truncates)."""
    return next((b for b in sorted(buckets) if length <= b), max(buckets))


def encode_each(tokenizer, examples: list[dict], input_names: list[str], length_of) -> list[dict]:
    """Each example alone, truncated to the longest bucket and padded to ``length_of(its length)``."""
    from sparsebert import inference

    longest = length_of(10**9)
    encoded = []
    for example in examples:
        natural = inference.encode(tokenizer, [example], input_names, longest, fixed_length=False)
        encoded.append(inference.encode(tokenizer, [example], input_names, length_of(natural["input_ids"].shape[1]),
                                        fixed_length=True, served_length=longest))  # cut as the server cuts
    return encoded


def _real_text_timed(model: Model, engine: str, requests: list[dict], lengths: list[int], mode: str,
                     threads) -> Timed:
    """Batch-1 requests in dev order, each sent to the runner of its own length."""
    runners = {n: Runner(engine, model.model_dir, model.deployment, 1, n, None if threads == "all" else threads)
               for n in lengths}
    position = [0]

    def call():
        request = requests[position[0] % len(requests)]
        position[0] += 1
        runners[request["input_ids"].shape[1]](request)

    def warm():  # every bucket's runner that serves a request, once, outside the timed turns
        for length, runner in runners.items():
            request = next((r for r in requests if r["input_ids"].shape[1] == length), None)
            if request is not None:
                runner(request)

    def close():
        for runner in runners.values():
            runner.close()

    key = {"family": model.family, "variant": model.variant, "precision": model.precision, "engine": engine,
           "input": mode, "batch_size": 1, "threads": threads}
    return Timed(key, call, 1, close, calls_per_pass=len(requests), warm=warm)


def real_text_benchmark(models: list[Model], examples: list[dict], buckets: list[int], seconds: float = 10.0,
                        engines=None, threads: list | None = None, progress=print) -> dict:
    """The dev texts at batch 1, padded to the longest bucket (``padded``) or run on the smallest
    bucket that holds each (``bucketed``), for every model on every engine (default: those that
    serve, as the server would), interleaved."""
    from transformers import AutoTokenizer

    threads, buckets, engines = threads or ["all"], sorted(buckets), engines if engines is not None else served_engines()
    longest = buckets[-1]
    tokenizer = AutoTokenizer.from_pretrained(models[0].deployment)
    names = onnx_input_names(models[0].deployment / "model.onnx")
    padded = encode_each(tokenizer, examples, names, lambda n: longest)
    bucketed = encode_each(tokenizer, examples, names, lambda n: bucket_of(n, buckets))
    tokens = [int(r["attention_mask"].sum()) for r in bucketed]
    rows = []
    for count in threads:
        timed = [t for m in models for e in timed_on(m, engines) for t in (
            _real_text_timed(m, e, padded, [longest], "padded", count),
            _real_text_timed(m, e, bucketed, buckets, "bucketed", count))]
        rows += measure_interleaved(timed, seconds, progress=progress)
    return {"examples": len(examples), "buckets": buckets, "seconds_per_measurement": seconds, "rounds": ROUNDS,
            "threads": threads, "tokens": {"mean": float(np.mean(tokens)), "p50": float(np.median(tokens)),
                                           "max": int(max(tokens))},
            "bucket_share": {str(b): sum(r["input_ids"].shape[1] == b for r in bucketed) / len(bucketed) for b in buckets},
            "machine": machine(), "rows": rows, "ratios": real_text_ratios(rows)}


def real_text_ratios(rows: list[dict]) -> list[dict]:
    """Each sparse model over the dense model on ONNX Runtime padding every request (the
    fixed-shape baseline), per engine and input, per thread count."""
    out = []
    for r in rows:
        if r["variant"] == "dense":
            continue
        base = next((b for b in rows if (b["family"], b["variant"], b["engine"], b["input"], b["threads"])
                     == (r["family"], "dense", "onnxruntime", "padded", r["threads"])), None)
        if base:
            out.append({k: r[k] for k in ("family", "variant", "precision", "engine", "input", "threads")}
                       | {"vs_dense_onnxruntime_padded": r["items_per_second"] / base["items_per_second"]})
    return out


# ---------------------------------------------------------------- ratios and reports


def ratios(rows: list[dict], bounds: dict | None = None) -> list[dict]:
    """Speed-ups of each sparse variant over the dense model of its family, per batch size and
    thread count, one per ratio column of the engine table (engines.ratio_columns). An INT8
    variant's keys say so (``sparse_int8_...``). ``bounds`` maps (family, variant) to the
    variant's measured sparsity and FLOP bound (sparsebert.flops), kept beside its ratios."""
    def speed(family, variant, engine, batch, threads):
        return next((r["items_per_second"] for r in rows if (r["family"], r["variant"], r["engine"], r["batch_size"],
                                                             r.get("threads", "all"))
                     == (family, variant, engine, batch, threads)), None)

    out = []
    variants = dict.fromkeys((r["family"], r["variant"], r.get("precision", "fp32")) for r in rows)
    for family, variant, precision in variants:
        if variant == "dense":
            continue
        prefix = "sparse_int8" if precision == "int8" else "sparse"
        for threads in dict.fromkeys(r.get("threads", "all") for r in rows):
            for batch in sorted({r["batch_size"] for r in rows}):
                pairs = {f"{prefix}_{suffix}": (speed(family, variant, sparse, batch, threads),
                                                speed(family, "dense", dense, batch, threads))
                         for sparse, dense, suffix, _ in ratio_columns()}
                measured = {k: a / b for k, (a, b) in pairs.items() if a and b}
                if measured:
                    out.append({"family": family, "variant": variant, "precision": precision, "batch_size": batch,
                                "threads": threads, **(bounds or {}).get((family, variant), {}), **measured})
    return out


def machine() -> dict:
    from sparsebert import hardware

    return hardware.describe_for_speed()


def machine_line(report: dict) -> str:
    """The CPU, its features and the ISA DeepSparse ran on: beside every speed figure."""
    m = report["machine"]
    isa = f"; DeepSparse on {m['deepsparse_isa']}" if m.get("deepsparse_isa") else ""
    return (f"{m.get('cpu') or m.get('processor')} ({m['cpus']} CPUs; "
            f"{', '.join(m.get('cpu_features', [])) or 'no AVX512'}{isa})")


def markdown(report: dict) -> str:
    engines, columns = engine_names(), [(suffix, header) for _, _, suffix, header in ratio_columns()]
    lines = [f"Fixed rows of {report['sequence_length']} tokens on {machine_line(report)}; threads per engine "
             f"{report['threads']}; {report.get('rounds', 1)} interleaved rounds; items/s (p50 ms per batch).", "",
             "| model | variant | threads | batch | " + " | ".join(engines) + " |",
             "|---|---|---|---|" + "---|" * len(engines)]
    keys = dict.fromkeys((r["family"], r["variant"], r.get("threads", "all"), r["batch_size"]) for r in report["rows"])
    for family, variant, threads, batch in keys:
        cells = []
        for engine in engines:
            r = next((r for r in report["rows"] if (r["family"], r["variant"], r.get("threads", "all"), r["batch_size"],
                                                    r["engine"]) == (family, variant, threads, batch, engine)), None)
            cells.append(f"{r['items_per_second']:.1f} ({r['p50_ms']:.1f})" if r else "-")
        lines.append(f"| {family} | {variant} | {threads} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "Speed-ups, each with its share of the FLOP bound: what perfect sparse kernels would give at "
              "the sparsity measured in the saved weights, with everything but the encoder linears dense "
              "(a share can pass 100%: INT8 makes the same FLOPs cheaper, and a ratio across engines holds the engines' own "
              "speed too).", "",
              "| model | variant | threads | batch | FLOP bound (sparsity) | " + " | ".join(h for _, h in columns) + " |",
              "|---|---|---|---|---|" + "---|" * len(columns)]
    for r in report["ratios"]:
        prefix = "sparse_int8" if r.get("precision") == "int8" else "sparse"
        bound = r.get("flop_bound")
        cells = [_ratio_cell(r.get(f"{prefix}_{k}"), bound) for k, _ in columns]
        bound_cell = f"{bound:.2f}x ({r['sparsity']:.1%})" if bound else "-"
        lines.append(f"| {r['family']} | {r['variant']} | {r.get('threads', 'all')} | {r['batch_size']} | "
                     f"{bound_cell} | " + " | ".join(cells) + " |")
    if report.get("real_text"):
        lines += ["", real_text_markdown(report["real_text"])]
    return "\n".join(lines) + "\n"


def _ratio_cell(ratio: float | None, bound: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x ({ratio / bound:.0%})" if bound else f"{ratio:.2f}x"


def real_text_markdown(real: dict) -> str:
    lines = [f"Real text: {real['examples']} dev examples at batch 1, {real['tokens']['mean']:.0f} tokens on average "
             f"(p50 {real['tokens']['p50']:.0f}, max {real['tokens']['max']}); buckets {real['buckets']} "
             f"(share {', '.join(f'{b}: {v:.0%}' for b, v in real['bucket_share'].items())}); items/s "
             "(p50 / p99 ms), and the speed-up over the dense model on ONNX Runtime padding every request.", "",
             "| model | variant | threads | engine | padded | bucketed | bucketed / dense ORT padded |",
             "|---|---|---|---|---|---|---|"]
    rows = real["rows"]
    for family, variant, threads, engine in dict.fromkeys((r["family"], r["variant"], r["threads"], r["engine"]) for r in rows):
        cell = {}
        for mode in ("padded", "bucketed"):
            r = next(r for r in rows if (r["family"], r["variant"], r["threads"], r["engine"], r["input"])
                     == (family, variant, threads, engine, mode))
            cell[mode] = f"{r['items_per_second']:.1f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f})"
        ratio = next((x["vs_dense_onnxruntime_padded"] for x in real["ratios"] if (x["family"], x["variant"], x["threads"],
                      x["engine"], x["input"]) == (family, variant, threads, engine, "bucketed")), None)
        lines.append(f"| {family} | {variant} | {threads} | {engine} | {cell['padded']} | {cell['bucketed']} | "
                     f"{f'{ratio:.2f}x' if ratio else '-'} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One panel per family, thread count and batch size (fixed rows), and one per thread count
    for real text: items/s of each variant on each engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{f}, {t} thread(s), batch {b}", [r for r in report["rows"] if (r["family"], r.get("threads", "all"),
                                                                              r["batch_size"]) == (f, t, b)], "engine")
              for f, t, b in dict.fromkeys((r["family"], r.get("threads", "all"), r["batch_size"]) for r in report["rows"])]
    real = report.get("real_text")
    if real:
        panels += [(f"real text (dev), {t} thread(s), batch 1", [r for r in real["rows"] if r["threads"] == t], "input")
                   for t in dict.fromkeys(r["threads"] for r in real["rows"])]
    columns = min(2, len(panels))
    rows_n = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(6.5 * columns, 3.8 * rows_n), squeeze=False)
    for ax, (title, rows, axis) in zip(axes.flat, panels):
        groups = list(dict.fromkeys(r["engine"] if axis == "engine" else f"{r['engine']}\n{r['input']}" for r in rows))
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / len(variants)
        for k, variant in enumerate(variants):
            values = [next((r["items_per_second"] for r in rows if r["variant"] == variant and
                            (r["engine"] if axis == "engine" else f"{r['engine']}\n{r['input']}") == g), 0) for g in groups]
            ax.bar(np.arange(len(groups)) + k * width, values, width, label=variant)
        ax.set_xticks(np.arange(len(groups)) + width * (len(variants) - 1) / 2, groups, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("items / s (higher is better)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{machine_line(report)}", fontsize=9)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / "bench.json", report, indent=2)
    atomic.write_text(out_dir / "bench.md", markdown(report))
    plot(report, out_dir / "bench.png")


BERT_BASE = "BERT-base (random weights)"


def bert_base_models(cache: Path, sparsities: list[float], sequence_length: int = 128, int8: bool = True) -> list[Model]:
    """A BERT-base-sized classifier with random weights, dense and magnitude-pruned per matrix
    to each of ``sparsities`` (speed depends on where the zeros are, not on the values), and
    with ``int8`` each pruned one made INT8 too (``quantized_copy``), built and exported once
    into ``cache``."""
    models = []
    for target in [0.0, *sparsities]:
        variant = "dense" if target == 0 else f"sparse {target:.0%}"
        folder = cache / ("dense" if target == 0 else f"sparse{round(target * 100)}")
        build_once(folder, sequence_length, lambda checkpoint, target=target: _random_bert_base(checkpoint, target))
        models.append(Model(BERT_BASE, variant, folder / "checkpoint", folder / "deployment"))
        if int8 and target:
            # named for what it quantizes: a cache from before held INT8 linears and FP32 attention
            quantized = folder.with_name(f"{folder.name}-int8-attention")
            build_once(quantized, sequence_length, lambda checkpoint, source=folder: quantized_copy(
                source / "checkpoint", checkpoint, sequence_length))
            models.append(Model(BERT_BASE, f"{variant} INT8", quantized / "checkpoint", quantized / "deployment",
                                precision="int8"))
    return models


def build_once(folder: Path, sequence_length: int, make_checkpoint) -> None:
    """``folder/checkpoint`` by ``make_checkpoint`` and its export, unless a whole one is there."""
    from sparsebert.deploy.export import export

    if not (folder / "deployment" / "model.onnx").is_file():
        # a killed build is never taken for the cache; one without its model is rebuilt
        with atomic.building(folder, overwrite=True) as partial:
            make_checkpoint(partial / "checkpoint")
            export(partial / "checkpoint", partial, sequence_length)


def int8_linears_only() -> dict:
    """INT8 recipe variables that keep the attention matmuls in FP32: the recipe's own
    ``not_quantized`` list and SparseML's quantizable matmul."""
    from sparsebert.recipe import recipe_path, recipe_variables

    return {"not_quantized": [*recipe_variables(recipe_path("sparsebert-int8"))["not_quantized"], "QATMatMul"]}


def quantized_copy(source: Path, folder: Path, sequence_length: int, batches: int = 4,
                    recipe_args: dict | None = None) -> None:
    """The pruned random model made INT8 as `train --int8` makes the student, less the training:
    the INT8 recipe's quantization (and zero-holding) modifiers applied, each scale observed on a
    few random batches, and saved with that recipe, so the export reads it as the QAT checkpoint
    it is and writes the same integer graph (MatMulInteger, zeros kept) as for a trained student.
    ONNX Runtime's own quantizers would write another graph than the one the project ships."""
    import math

    import torch
    from sparseml.pytorch.optim import ScheduledModifierManager
    from torch.ao.quantization import disable_observer, enable_observer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsebert.recipe import recipe_path
    from sparsebert.sparseml_mends import quantizable

    shipped = ScheduledModifierManager.from_yaml(str(recipe_path("sparsebert-int8")), recipe_variables=recipe_args)
    recipe = ScheduledModifierManager([m for m in shipped.iter_modifiers() if type(m).__name__ in
                                       ("QuantizationModifier", "ConstantPruningModifier")])  # no distillation
    model = quantizable(AutoModelForSequenceClassification.from_pretrained(source).eval())
    recipe.apply_structure(model, epoch=math.inf)
    model.apply(enable_observer)
    with torch.no_grad():
        for seed in range(batches):
            inputs = random_inputs(["input_ids", "attention_mask"], 4, sequence_length, seed=seed)
            model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    model.apply(disable_observer)
    model.save_pretrained(folder)
    recipe.save(str(folder / "recipe.yaml"))
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def prune_by_magnitude(model, sparsity: float, mask_type: str = "unstructured") -> None:
    """Cut each matrix the recipe prunes in ``model`` (its family's six linears a layer) to ``sparsity`` zeros on its own, by
    magnitude, with SparseML's mask creator for ``mask_type`` (as GMP cuts them), in place: speed
    depends on where the zeros are, not on the weights' values, so benchmarks need no training."""
    import torch
    from sparseml.pytorch.sparsification.pruning.mask_creator import get_mask_creator_default

    from sparsebert import families
    from sparsebert.checkpoint import is_pruned

    creator, patterns = get_mask_creator_default(mask_type), families.of_config(model.config).pruned_params()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if sparsity and is_pruned(name, patterns):
                (mask,) = creator.create_sparsity_masks([param.data.abs()], [sparsity])
                param.mul_(mask)


def _random_bert_base(folder: Path, sparsity: float) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparsebert.models import embedded_default

    torch.manual_seed(0)
    config = BertConfig(num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config).eval()
    prune_by_magnitude(model, sparsity)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_default()).save_pretrained(folder)  # same uncased vocab
