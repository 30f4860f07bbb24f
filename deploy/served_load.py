"""What the HTTP endpoint sustains on real requests: ``sparsebert loadtest RUN``.

Each of the run's models is served in turn (the validating server, on loopback) and driven by
1, 4, 16 and 64 concurrent clients sending the task's dev texts one per request, at their own
lengths; with ``batch_size`` above 1 every server batches concurrent requests (dynamic
batching). Every answer must match the one the same server gave that text alone (0 errors, 0
mismatches, or the run fails). The baseline is what a plain deployment does: the dense model on
ONNX Runtime with every request padded to the exported length; the sparse models are served on
DeepSparse with sequence-length buckets.

The server and the clients share this process and the machine's cores, so the figures are a
lower bound on a dedicated server; the ratios compare like with like. Writes
``<run>/bench/loadtest.{json,md,png}``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparsebert import inference
from sparsebert.deploy.loadtest import expected_answers, run_load
from sparsebert.deploy.serve import DEFAULT_BATCH_WINDOW_MS
from sparsebert.runfolder import INT8, RunFolder

CLIENTS = (1, 4, 16, 64)


@dataclass
class Served:
    variant: str
    checkpoint: str
    engine: str
    precision: str
    padded: bool  # one bucket, the exported length: every request padded to it


def servers(run: RunFolder) -> list[Served]:
    sparsity = run.metrics["student"]["encoder_linear_sparsity"]
    out = [Served("dense", "teacher", "onnxruntime", "fp32", padded=True),
           Served(f"sparse {sparsity:.0%}", "student", "deepsparse", "fp32", padded=False)]
    if INT8 in run.checkpoints:
        out.append(Served(f"sparse {sparsity:.0%} INT8", INT8, "deepsparse", "int8", padded=False))
    return out


def requests(run: RunFolder, count: int) -> list:
    """The first ``count`` dev examples as request bodies' ``sequences``: one text, or one pair."""
    examples = run.examples(run.dev_splits[0])[:count]
    return [inference.as_sequences([e]) if "sentence2" in e else e["sentence1"] for e in examples]


def sweep(run: RunFolder, clients: tuple[int, ...] = CLIENTS, seconds: float = 10.0, examples: int = 200,
          buckets: tuple[int, ...] = (32, 64, 128), threads: int | None = None, progress=print,
          batch_size: int = 1, batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS) -> dict:
    """Every served model at every client count; ``threads``: the engines' cores (None: all);
    ``batch_size`` and ``batch_window_ms``: every server's dynamic batching (1: none)."""
    from sparsebert import hardware
    from sparsebert.deploy.local import local_server

    inputs = requests(run, examples)
    plan = [(served, run.deployment(served.checkpoint), run.exported_length(served.checkpoint))
            for served in servers(run)]  # every deployment found before any is served
    rows = []
    for served, deployment, length in plan:
        # The longest bucket is always the exported length: no server truncates where another does not.
        lengths = (length,) if served.padded else tuple(sorted({min(b, length) for b in buckets} | {length}))
        with tempfile.TemporaryDirectory(prefix="sparsebert-load-") as workdir, \
                local_server(deployment, served.engine, Path(workdir), name="load", sequence_lengths=lengths,
                             threads=threads, batch_size=batch_size, batch_window_ms=batch_window_ms) as client:
            expected = expected_answers(client, inputs)
            for count in clients:
                report = run_load(client.url, "load", clients=count, seconds=seconds, max_requests=10**9,
                                  inputs=inputs, expected=expected)
                rows.append({"variant": served.variant, "checkpoint": served.checkpoint, "engine": served.engine,
                             "precision": served.precision, "sequence_lengths": list(lengths), "clients": count,
                             "requests": report["requests"], "errors": report["errors"],
                             "mismatches": report["mismatches"], "throughput_rps": report["throughput_rps"],
                             "p50_ms": report["latency_ms"]["p50"], "p99_ms": report["latency_ms"]["p99"]})
                progress(f"  {served.variant:16} {served.engine:11} buckets {str(list(lengths)):14} {count:3} "
                         f"client(s): {report['throughput_rps']:7.1f} requests/s, p50 {report['latency_ms']['p50']:7.1f} ms, "
                         f"p99 {report['latency_ms']['p99']:7.1f} ms, {report['errors']} errors")
    for row in rows:
        base = next(r for r in rows if r["variant"] == "dense" and r["clients"] == row["clients"])
        row["vs_dense_onnxruntime_padded"] = row["throughput_rps"] / base["throughput_rps"]
    return {"task": run.task.name, "examples": len(inputs), "seconds_per_measurement": seconds,
            "engine_threads": threads or "all", "batch_size": batch_size,
            "batch_window_ms": batch_window_ms if batch_size > 1 else None,
            "machine": hardware.describe_for_speed(), "rows": rows}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"{report['task']} dev texts, one per request ({report['examples']} texts, each sent alone first to "
             f"learn its answer), {report['seconds_per_measurement']:g} s per row, engine threads "
             f"{report.get('engine_threads', 'all')}; {m['cpu']} ({m['cpus']} CPUs; DeepSparse on "
             f"{m.get('deepsparse_isa', 'an ISA not recorded')}). "
             f"Server and clients share the machine; {batching(report)}.", "",
             "| model | engine | buckets | clients | requests/s | p50 ms | p99 ms | errors | vs dense ORT padded |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['engine']} | {r['sequence_lengths']} | {r['clients']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['errors'] + r['mismatches']} | {r['vs_dense_onnxruntime_padded']:.2f}x |")
    return "\n".join(lines) + "\n"


def batching(report: dict) -> str:
    size = report.get("batch_size", 1)
    if size == 1:
        return "the server answers one text an engine call (batch 1)"
    return (f"the server batches concurrent requests, up to {size} texts an engine call, each text waiting "
            f"at most {report['batch_window_ms']:g} ms for others")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for variant in dict.fromkeys(r["variant"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["variant"] == variant]
        label = f"{variant} ({rows[0]['engine']})"
        left.plot([r["clients"] for r in rows], [r["throughput_rps"] for r in rows], "o-", label=label)
        right.plot([r["clients"] for r in rows], [r["p99_ms"] for r in rows], "o-", label=label)
    for ax, title in ((left, "throughput (requests/s, higher is better)"), (right, "p99 latency (ms, lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['task']} dev texts over HTTP; {report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "loadtest.json").write_text(json.dumps(report, indent=2))
    (out_dir / "loadtest.md").write_text(markdown(report))
    plot(report, out_dir / "loadtest.png")
