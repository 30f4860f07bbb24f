"""Where a forward pass's time goes: each engine's own per-kernel timing (ONNX Runtime's profiler,
DeepSparse's debug analysis engine), each kernel traced back to the exported graph's nodes and
summed by category (``CATEGORIES``), so that the share of the pass the pruned linears take (the
only work sparsity removes) can be set against their share of the FLOPs.

Every kernel is attributed through the graph: a node of the exported ONNX file is classified by
the module that emitted it (the TorchScript exporter names each node after its module scope,
``/bert/encoder/layer.0/attention/self/query/MatMul``) and its op; an engine's kernel is the node
it is named after (ONNX Runtime keeps the names of the nodes it fuses into) or the node that
produces its output tensor (what DeepSparse reports). A DeepSparse kernel that fuses several
nodes (a linear with the residual add and LayerNorm after it) counts as its costliest category,
first in ``CATEGORIES``; the nodes it fused are kept beside it in the report.

Writes ``profile.json``, ``profile.md`` and ``profile.png`` (one stacked bar per engine and model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsebert import atomic
from sparsebert.checkpoint import is_pruned

# In order of cost: a fused kernel counts as the first of the categories it holds.
CATEGORIES = ("encoder_linears", "attention_matmuls", "softmax", "layernorm_gelu", "embeddings", "rest")
LABELS = {"encoder_linears": "encoder linears", "attention_matmuls": "attention matmuls", "softmax": "softmax",
          "layernorm_gelu": "LayerNorm / GELU", "embeddings": "embeddings", "rest": "rest"}
ENGINES = ("onnxruntime", "deepsparse")
# A kernel ONNX Runtime made from several nodes and named after none of them: its op says what it is.
_FUSED_OPS = {"BiasGelu": "layernorm_gelu", "FastGelu": "layernorm_gelu", "Gelu": "layernorm_gelu",
              "LayerNormalization": "layernorm_gelu", "SkipLayerNormalization": "layernorm_gelu"}
_QUANTIZE = {"QuantizeLinear", "DynamicQuantizeLinear"}
_MATMULS = {"MatMul", "Gemm", "MatMulInteger", "FusedMatMul", "FusedGemm", "QLinearMatMul"}


class ProfileError(Exception):
    pass


# ---------------------------------------------------------------- the graph's nodes


def module_of(node_name: str) -> str:
    """The module scope a node was exported from, as a parameter prefix:
    ``/bert/encoder/layer.0/attention/self/query/module/MatMulInteger`` -> ``bert.encoder.layer.0.
    attention.self.query`` (``module`` is the wrapper QAT puts around a linear; what follows it is
    the quantization's own nodes)."""
    scope = node_name.strip("/").split("/")[:-1]
    if "module" in scope:
        scope = scope[:scope.index("module")]
    return ".".join(scope)


def category_of(node, initializers: set[str], patterns: list[str]) -> str:
    module = module_of(node.name)
    leaf = module.rsplit(".", 1)[-1]
    if module and is_pruned(f"{module}.weight", patterns):
        return "encoder_linears"  # the matmul, its bias and (INT8) its input's quantization
    if any(part.endswith("_matmul") for part in module.split(".")):
        return "attention_matmuls"  # an INT8 attention matmul: its operands' quantization and its rescale
    if node.op_type in _MATMULS and not any(i in initializers for i in node.input[:2]):
        return "attention_matmuls"  # q.k and probabilities.v: both operands are activations (INT8: zero points aside)
    if node.op_type == "Softmax":
        return "softmax"
    if leaf in ("LayerNorm", "intermediate_act_fn") or node.op_type in _FUSED_OPS:
        return "layernorm_gelu"
    if module.split(".")[1:2] == ["embeddings"]:  # <prefix>.embeddings...: bert, roberta, mpnet...
        return "embeddings"
    return "rest"


@dataclass
class Graph:
    """The exported graph's nodes, each with its category, and which node makes each tensor."""
    category: dict[str, str]  # node name -> category
    producer: dict[str, str]  # tensor name -> node name
    # (op, its initializer inputs) -> node name, where that pair is the node's alone (a node an engine moves keeps it)
    signature: dict[tuple, str]
    initializers: set[str]

    @classmethod
    def read(cls, onnx_path: Path, patterns: list[str]) -> "Graph":
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        nameless = [n.op_type for n in graph.node if not n.name]
        if nameless:
            raise ProfileError(f"{onnx_path}: {len(nameless)} nodes have no name ({nameless[:3]}); they cannot be "
                               "told apart in a profile")
        category = {n.name: category_of(n, initializers, patterns) for n in graph.node}
        _quantization_with_its_matmul(graph.node, category)
        return cls(category, {out: n.name for n in graph.node for out in n.output},
                   _unique_signatures(graph.node, initializers), initializers)

    def named(self, name: str) -> str | None:
        """The node a kernel is named after (a fused kernel keeps its first node's name, plus a suffix)."""
        if name in self.category:
            return name
        return next((n for n in _prefixes(name) if n in self.category), None)

    def maker(self, tensor: str) -> str | None:
        """The node that makes ``tensor``, or the tensor an engine renamed it from by a suffix
        (``..._output_0_pre_q``: a QuantizeLinear moved past it)."""
        if tensor in self.producer:
            return self.producer[tensor]
        cuts = [i for i, c in enumerate(tensor) if c == "_"]
        return next((self.producer[tensor[:i]] for i in reversed(cuts) if tensor[:i] in self.producer), None)


def _quantization_with_its_matmul(nodes, category: dict[str, str]) -> None:
    """An INT8 matmul's input quantization is that matmul's cost (a QuantizeLinear that feeds
    encoder linears only, or attention matmuls only)."""
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    for n in nodes:
        users = {category[c] for o in n.output for c in consumers.get(o, [])}
        if n.op_type in _QUANTIZE and len(users) == 1 and users <= {"encoder_linears", "attention_matmuls"}:
            category[n.name] = users.pop()


def _unique_signatures(nodes, initializers: set[str]) -> dict[tuple, str]:
    """(op, its initializer inputs) -> the node, for the pairs only one node has."""
    signatures: dict[tuple, list[str]] = {}
    for n in nodes:
        constants = tuple(i for i in n.input if i in initializers)
        if constants:
            signatures.setdefault((n.op_type, constants), []).append(n.name)
    return {key: names[0] for key, names in signatures.items() if len(names) == 1}


def _prefixes(name: str):
    parts = name.split("/")
    for end in range(len(parts) - 1, 1, -1):
        yield "/".join(parts[:end])


# ---------------------------------------------------------------- the engines' timings


@dataclass
class Kernel:
    name: str  # the engine's name for it
    ms: float  # per pass
    category: str
    nodes: list[str]  # the graph nodes it stands for


def split(kernels: list[Kernel], total_ms: float) -> dict:
    """Per-category ms and share of the pass; time outside every kernel goes to ``rest`` too,
    and is kept on its own as ``outside_kernels_ms``."""
    by_category = {c: sum(k.ms for k in kernels if k.category == c) for c in CATEGORIES}
    outside = max(total_ms - sum(by_category.values()), 0.0)
    by_category["rest"] += outside
    total = sum(by_category.values())
    return {"total_ms": total, "outside_kernels_ms": outside, "ms": by_category,
            "share": {c: v / total for c, v in by_category.items()} if total else {}}


def onnxruntime_kernels(onnx_path: Path, graph: Graph, inputs: dict, threads: int | None, passes: int,
                        warmup: int = 3) -> tuple[list[Kernel], float]:
    """ONNX Runtime's profiler over ``passes`` runs (after ``warmup``), on the graph it optimizes
    as the bench runs it (its default level, fusions included); its saved optimized graph says
    what each fused kernel makes."""
    import onnx
    import onnxruntime

    folder = Path(tempfile.mkdtemp(prefix="sparsebert-profile-"))
    try:
        options = onnxruntime.SessionOptions()
        options.enable_profiling, options.profile_file_prefix = True, str(folder / "ort")
        options.optimized_model_filepath = str(folder / "optimized.onnx")
        options.log_severity_level = 3  # its note on saving a graph optimized for this CPU
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + passes):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = {n.name: n for n in onnx.load(str(folder / "optimized.onnx")).graph.node}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    runs = [e for e in events if e["cat"] == "Session" and e["name"] == "model_run"][warmup:]
    if len(runs) != passes:
        raise ProfileError(f"ONNX Runtime's profile holds {len(runs)} timed runs, not {passes}")
    # Per pass, then the median of each kernel: a pass the OS preempted (a shared core) moves a mean.
    per_pass = [{} for _ in runs]
    for e in events:
        if e["cat"] == "Node" and e["name"].endswith("_kernel_time"):
            i = next((i for i, r in enumerate(runs) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]), None)
            if i is not None:
                name = e["name"].removesuffix("_kernel_time")
                per_pass[i][name] = per_pass[i].get(name, 0.0) + e["dur"] / 1000
    names = dict.fromkeys(n for p in per_pass for n in p)
    kernels = [_ort_kernel(n, float(np.median([p.get(n, 0.0) for p in per_pass])), optimized, graph) for n in names]
    outside = float(np.median([r["dur"] / 1000 - sum(p.values()) for r, p in zip(runs, per_pass)]))
    return kernels, sum(k.ms for k in kernels) + max(outside, 0.0)


def _ort_kernel(name: str, ms: float, optimized: dict, graph: Graph) -> Kernel:
    if name not in optimized:
        raise ProfileError(f"ONNX Runtime timed a kernel {name!r} that its optimized graph does not hold")
    node = optimized[name]
    # Named after a node; else a node ORT moved (an INT8 graph's QuantizeLinear, pushed above a
    # Transpose and renamed after the tensor it now reads), known by its op and constants; else the
    # maker of its output, or (a node ORT inserted) of the input it reads.
    constants = tuple(i for i in node.input if i in graph.initializers)
    original = (graph.named(name) or graph.signature.get((node.op_type, constants))
                or next(filter(None, map(graph.maker, [*node.output, *node.input])), None))
    if original is None:
        if node.op_type not in _FUSED_OPS:
            raise ProfileError(f"ONNX Runtime's kernel {name!r} ({node.op_type}) traces to no node of the exported graph")
        return Kernel(name, ms, _FUSED_OPS[node.op_type], [])
    return Kernel(name, ms, graph.category[original], [original])


def deepsparse_kernels(onnx_path: Path, graph: Graph, inputs: list[np.ndarray], batch_size: int, threads: int | None,
                       passes: int, warmup: int = 3) -> tuple[list[Kernel], float]:
    """DeepSparse's own per-layer timing (``model_debug_analysis``: the mean of each layer over
    ``passes``). Its "Naive Subgraph" entries, the parts it runs outside its compiled kernels,
    name no tensor and count as ``rest``."""
    from deepsparse.engine import model_debug_analysis

    from sparsebert.deploy.engines import private_copy

    with private_copy(onnx_path) as copy:  # DeepSparse rewrites the file it loads
        shapes = [list(a.shape) for a in inputs]
        result = model_debug_analysis(str(copy), inputs, batch_size=batch_size, num_cores=threads,
                                      num_iterations=passes, num_warmup_iterations=warmup, input_shapes=shapes)
    kernels = []
    for layer in _layers(result["layer_info"]):
        tensors = [t for t in layer.get("canonical_name", "").split(",") if t and t != "<none>"]
        nodes = [graph.maker(t) for t in tensors]
        if None in nodes:
            raise ProfileError(f"DeepSparse's layer {layer['name']} makes tensors the exported graph does not: "
                               f"{[t for t, n in zip(tensors, nodes) if n is None][:3]}")
        # a layer that names no tensor (a shuffle, a gather) is the engine's own data movement
        category = min((graph.category[n] for n in nodes), key=CATEGORIES.index, default="rest")
        kernels.append(Kernel(layer["name"], layer["average_run_time_in_ms"], category, nodes))
    return kernels, sum(k.ms for k in kernels)


def _layers(layer_info: list[dict]):
    for layer in layer_info:
        subs = layer.get("sub_layer_info") or []
        yield from (_layers(subs) if subs else [layer])


# ---------------------------------------------------------------- one model, every engine


@dataclass
class Target:
    name: str  # "dense", "sparse 95%", "sparse 95% INT8"
    model_dir: Path
    deployment: Path


def profile_model(target: Target, sequence_length: int, batch_size: int = 1, threads: int | None = 1,
                  passes: int = 20, engines=ENGINES) -> list[dict]:
    """One row per engine: the pass split by category, and the kernels behind it."""
    from sparsebert.checkpoint import pruned_patterns
    from sparsebert.deploy.bench import random_inputs
    from sparsebert.inference import onnx_input_names

    onnx_path = target.deployment / "model.onnx"
    graph = Graph.read(onnx_path, pruned_patterns(target.model_dir))
    names = onnx_input_names(onnx_path)
    inputs = random_inputs(names, batch_size, sequence_length)
    rows = []
    for engine in engines:
        if engine == "onnxruntime":
            kernels, total = onnxruntime_kernels(onnx_path, graph, inputs, threads, passes)
        elif engine == "deepsparse":
            kernels, total = deepsparse_kernels(onnx_path, graph, [inputs[n] for n in names], batch_size, threads,
                                                passes)
        else:
            raise ProfileError(f"no per-kernel profiler for engine {engine!r}; profiled: {', '.join(ENGINES)}")
        rows.append({"model": target.name, "engine": engine, **split(kernels, total),
                     "plain_pass_ms": plain_pass_ms(engine, target, inputs, batch_size, sequence_length, threads, passes),
                     "kernels": [k.__dict__ for k in kernels]})
    return rows


def plain_pass_ms(engine: str, target: Target, inputs: dict, batch_size: int, sequence_length: int,
                  threads: int | None, passes: int) -> float:
    """The median pass on the bench's own runner, no profiler: what the profiled split is a split of."""
    import time

    from sparsebert.deploy.engines import Runner

    runner = Runner(engine, target.model_dir, target.deployment, batch_size, sequence_length, threads)
    try:
        runner(inputs)
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            runner(inputs)
            times.append(time.perf_counter() - start)
    finally:
        runner.close()
    return float(np.median(times)) * 1000


def time_bound(dense_linear_share: float, sparsity: float) -> float:
    """The speed-up the pruned linears could give on an engine whose dense pass spends
    ``dense_linear_share`` of its time in them, were their time to shrink with their weights
    (the FLOP bound's Amdahl, on measured time rather than FLOPs)."""
    return 1.0 / ((1.0 - dense_linear_share) + dense_linear_share * (1.0 - sparsity))


def compare(rows: list[dict], bounds: dict[str, dict]) -> list[dict]:
    """Each sparse model's pass against the dense model's on the same engine and on dense ONNX
    Runtime, beside its FLOP bound and the bound the dense pass's measured linear share gives."""
    dense = {r["engine"]: r for r in rows if r["model"] == "dense"}
    out = []
    for r in rows:
        if r["model"] == "dense" or r["engine"] not in dense:
            continue
        bound = bounds.get(r["model"], {})
        base = dense[r["engine"]]
        entry = {"model": r["model"], "engine": r["engine"], "vs_dense_same_engine": base["total_ms"] / r["total_ms"],
                 **bound}
        if "onnxruntime" in dense:
            entry["vs_dense_onnxruntime"] = dense["onnxruntime"]["total_ms"] / r["total_ms"]
            if "plain_pass_ms" in r:  # a shared core preempts long passes more than short ones: see both
                entry["plain_vs_dense_onnxruntime"] = dense["onnxruntime"]["plain_pass_ms"] / r["plain_pass_ms"]
        if "sparsity" in bound:
            entry["time_bound"] = time_bound(base["share"]["encoder_linears"], bound["sparsity"])
        out.append(entry)
    return out


def flop_shares(model_dir: Path, sequence_length: int) -> dict[str, float]:
    """The dense pass's FLOPs by part (sparsebert.flops), as shares."""
    from sparsebert import flops

    config = json.loads((Path(model_dir) / "config.json").read_text())
    parts = flops.forward_flops(config, sequence_length)
    return {k: v / sum(parts.values()) for k, v in parts.items()}


# ---------------------------------------------------------------- reports


def markdown(report: dict) -> str:
    from sparsebert.deploy.bench import machine_line

    lines = [f"Forward pass of {report['sequence_length']} tokens, batch {report['batch_size']}, "
             f"{report['threads']} thread(s), {report['passes']} passes, on {machine_line(report)}. "
             "Each engine's own per-kernel timing (ONNX Runtime's profiler, DeepSparse's debug analysis), each "
             "kernel traced to the exported graph's nodes; ms per pass (share). A kernel that fuses nodes of several "
             "categories counts in the costliest (DeepSparse runs the softmax inside the attention matmul's kernel, "
             "the GELU inside the intermediate linear's, and some LayerNorms inside the linear before them, which "
             "ones varying by model). Plain pass: the median pass on the bench's runner, without the profiler.", "",
             "| model | engine | plain pass ms | profiled pass ms | " + " | ".join(LABELS[c] for c in CATEGORIES) + " |",
             "|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for r in report["rows"]:
        cells = [f"{r['ms'][c]:.2f} ({r['share'][c]:.0%})" for c in CATEGORIES]
        lines.append(f"| {r['model']} | {r['engine']} | {r['plain_pass_ms']:.2f} | {r['total_ms']:.2f} | "
                     + " | ".join(cells) + " |")
    shares = report["flop_shares"]
    lines += ["", f"FLOPs of the dense pass: encoder linears {shares['encoder_linears']:.0%}, attention matmuls "
              f"{shares['attention_matmuls']:.0%}, elementwise {shares['elementwise']:.0%} (sparsebert/flops.py).",
              "", "Speed-ups beside the FLOP bound (and the share of it reached) and the time bound: the same Amdahl on "
              "the dense pass's measured linear share on that engine (what perfect sparse kernels could give there, "
              "everything else as it is). Within an engine, the profiled passes; across engines, the plain ones (the "
              "profilers count apart: ONNX Runtime's per-kernel medians here, DeepSparse's per-layer means). "
              "`sparsebert bench` measures the ratios the gates read, interleaved.", "",
              "| model | engine | / dense, same engine (profiled) | / dense ORT (plain passes) | FLOP bound (sparsity) "
              "| time bound |", "|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        time_cell = f"{c['time_bound']:.2f}x" if "time_bound" in c else "-"
        lines.append(f"| {c['model']} | {c['engine']} | {c['vs_dense_same_engine']:.2f}x | {_reached(c)} | "
                     f"{_bound_cell(c)} | {time_cell} |")
    return "\n".join(lines) + "\n"


def _reached(c: dict) -> str:
    ratio = c.get("plain_vs_dense_onnxruntime")
    if ratio is None:
        return "-"
    bound = c.get("flop_bound")
    return f"{ratio:.2f}x" + (f" ({ratio / bound:.0%} of the bound)" if bound else "")


def _bound_cell(c: dict) -> str:
    return f"{c['flop_bound']:.2f}x ({c['sparsity']:.1%})" if c.get("flop_bound") else "-"


def plot(report: dict, path: Path) -> None:
    """A stacked bar per engine and model: each category's share of the pass, its ms on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.5))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for category in CATEGORIES:
        values = np.array([r["share"][category] * 100 for r in rows])
        ax.bar(x, values, 0.7, bottom=bottom, label=LABELS[category])
        bottom += values
    for i, r in enumerate(rows):
        ax.text(i, 101, f"{r['total_ms']:.1f} ms", ha="center", fontsize=7)
    ax.set_xticks(x, [f"{r['engine']}\n{r['model']}" for r in rows], fontsize=7)
    ax.set_ylabel("share of the forward pass (%)")
    ax.set_ylim(0, 108)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    m = report["machine"]
    ax.set_title(f"{report['family']}: {report['sequence_length']} tokens, batch {report['batch_size']}, "
                 f"{report['threads']} thread(s)\n{m.get('cpu')}; DeepSparse on {m.get('deepsparse_isa')}", fontsize=8)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: Path, stem: str = "profile") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / f"{stem}.json", report, indent=2)
    atomic.write_text(out_dir / f"{stem}.md", markdown(report))
    plot(report, out_dir / f"{stem}.png")


def profile(family: str, targets: list[Target], sequence_length: int, batch_size: int = 1, threads: int | None = 1,
            passes: int = 20, engines=ENGINES, progress=print) -> dict:
    """Every target on every engine; the first target is the dense model the others are set against."""
    from sparsebert import flops, hardware

    rows = []
    for target in targets:
        progress(f"[sparsebert] profiling {family} {target.name} on {', '.join(engines)}")
        rows += profile_model(target, sequence_length, batch_size, threads, passes, engines)
    bounds = {t.name: flops.bound_for(t.model_dir, sequence_length) for t in targets if t.name != "dense"}
    return {"family": family, "sequence_length": sequence_length, "batch_size": batch_size, "threads": threads,
            "passes": passes, "machine": hardware.describe_for_speed(), "categories": list(CATEGORIES),
            "flop_shares": flop_shares(targets[0].model_dir, sequence_length), "rows": rows,
            "comparisons": compare(rows, bounds)}
