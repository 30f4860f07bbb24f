"""The ``onnxruntime-sparse`` engine: the exported ONNX file on ONNX Runtime, except its pruned
MatMuls, which run on the CSR kernel of ``sparse_kernels`` (Numba). Both are licence-clean (MIT,
BSD) and install from pip wheels.

ONNX Runtime densifies sparse weights when it loads them, so it multiplies the zeros; its
custom-op route needs a compiled library. Instead the graph is cut at each pruned MatMul (a
MatMul whose weight is a 2-D initializer at least ``CSR_MIN_SPARSITY`` zeros) into dense segments,
each its own ONNX Runtime session, with the kernel between them:

- every node gets a *level*, the number of pruned MatMuls on the longest path from the inputs to
  it; segment ``s`` holds the dense nodes of level ``s``, in the file's order;
- a pruned MatMul reading a value of level ``s`` runs after segment ``s``; segment ``s`` also
  hands it that value flattened and transposed (feature-major, what the kernel reads) and the
  shape its output must take; segment ``s + 1`` turns the kernel's output back.

In BERT this gives four segments a layer (the query/key/value MatMuls share one), so the dense
work (attention, softmax, LayerNorm, GELU) runs on ONNX Runtime's kernels, not in Python.
The transposes stay inside the sessions: ONNX Runtime's are faster than numpy's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsebert.deploy.engines import CSR_MIN_SPARSITY
from sparsebert.deploy.sparse_kernels import CSRMatrix


@dataclass
class PrunedMatMul:
    node_name: str
    x: str  # the activations it reads (..., in)
    y: str  # what the graph calls its output (..., out): the MatMul's, or its bias Add's
    weight: CSRMatrix  # the MatMul's (in x out) initializer, transposed: out x in
    stage: int  # runs after segment `stage`
    bias: np.ndarray | None = None  # the Add after it, when the kernel does it (then y is the Add's)

    @property
    def x_t(self) -> str:  # x flattened to (tokens, in) and transposed: the kernel's input
        return f"{self.x}::kernel_in"

    @property
    def y_t(self) -> str:  # the kernel's output, (out, tokens)
        return f"{self.y}::kernel_out"

    @property
    def y_shape(self) -> str:  # x's shape with its last dimension replaced by out
        return f"{self.y}::sparse_shape"


@dataclass
class Segment:
    nodes: list = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    session: object = None


def pruned_matmuls(model, min_sparsity: float = CSR_MIN_SPARSITY) -> dict[str, CSRMatrix]:
    """{MatMul node name: its weight as CSR (out x in)} for each MatMul whose second input is a
    2-D initializer with at least ``min_sparsity`` zeros."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2:
            continue
        array = numpy_helper.to_array(weight)
        if array.dtype == np.float32 and float(np.mean(array == 0)) >= min_sparsity:
            found[node.name] = CSRMatrix.from_dense(array.T)
    return found


def bias_adds(model, pruned: dict[str, CSRMatrix]) -> dict[str, tuple[str, np.ndarray]]:
    """{pruned MatMul name: (output of its bias Add, the bias)} where the MatMul's output goes to
    one Add of a 1-D initializer as wide as it, and nowhere else: the kernel adds the bias (one
    ONNX Runtime op fewer per linear, each costing more than adding it in the kernel)."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers, outputs = {}, {o.name for o in graph.output}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folds = {}
    for node in graph.node:
        if node.name not in pruned or node.output[0] in outputs or len(readers.get(node.output[0], [])) != 1:
            continue
        (add,) = readers[node.output[0]]
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if other not in initializers:
            continue
        bias = numpy_helper.to_array(initializers[other])
        if bias.dtype == np.float32 and bias.shape == (pruned[node.name].shape[0],):
            folds[node.name] = (add.output[0], bias)
    return folds


def split(model, min_sparsity: float = CSR_MIN_SPARSITY) -> tuple[list[Segment], list[PrunedMatMul]]:
    """The graph's dense segments (without sessions) and its pruned MatMuls, by level."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    weights = pruned_matmuls(model, min_sparsity)
    folds = bias_adds(model, weights)
    folded = {add_output for add_output, _ in folds.values()}
    level = {i.name: 0 for i in graph.input}
    node_level, pruned = [], []
    for node in graph.node:
        if any(attr.type in (5, 10) for attr in node.attribute):  # GRAPH / GRAPHS: If, Loop, Scan
            raise ValueError(f"node {node.name} ({node.op_type}) holds a subgraph; the sparse engine cuts flat graphs")
        reads = [name for name in node.input if name and name not in initializers]
        at = max((level[name] for name in reads), default=0)
        if node.name in weights:
            # Its input may be a graph input or another pruned MatMul's output: either is a value
            # of segment `at` (a pruned output is turned back at the start of the next segment).
            y, bias = folds.get(node.name, (node.output[0], None))
            pruned.append(PrunedMatMul(node.name, node.input[0], y, weights[node.name], stage=at, bias=bias))
            level[node.output[0]] = level[y] = at + 1
            continue
        if node.output[0] in folded:  # a bias Add the kernel does
            continue
        node_level.append((node, at))
        for name in node.output:
            level[name] = at
    count = max([at for _, at in node_level] + [p.stage + 1 for p in pruned], default=0) + 1
    segments = [Segment() for _ in range(count)]
    for node, at in node_level:
        segments[at].nodes.append(node)
    return segments, pruned


def _glue_nodes(segments: list[Segment], pruned: list[PrunedMatMul]) -> dict:
    """Add to each segment the nodes that hand its pruned MatMuls their inputs and take their
    outputs back; returns the initializers those nodes need."""
    from onnx import helper, numpy_helper

    constants = {"sparse::keep_last": np.array([-1], dtype=np.int64), "sparse::zero": np.array([0], dtype=np.int64)}
    transposed = set()
    for op in pruned:
        before, after = segments[op.stage], segments[op.stage + 1]
        rows, cols = op.weight.shape  # out, in
        flat_shape, out_dim = f"sparse::flat_{cols}", f"sparse::dim_{rows}"
        constants[flat_shape] = np.array([-1, cols], dtype=np.int64)
        constants[out_dim] = np.array([rows], dtype=np.int64)
        if op.x_t not in transposed:  # query, key and value read one input: transpose it once
            transposed.add(op.x_t)
            before.nodes += [helper.make_node("Reshape", [op.x, flat_shape], [f"{op.x}::flat_in"]),
                             helper.make_node("Transpose", [f"{op.x}::flat_in"], [op.x_t], perm=[1, 0])]
        before.nodes += [
            helper.make_node("Shape", [op.x], [f"{op.y}::x_shape"]),
            helper.make_node("Slice", [f"{op.y}::x_shape", "sparse::zero", "sparse::keep_last"], [f"{op.y}::lead"]),
            helper.make_node("Concat", [f"{op.y}::lead", out_dim], [op.y_shape], axis=0),
        ]
        after.nodes[:0] = [helper.make_node("Transpose", [op.y_t], [f"{op.y}::flat_out"], perm=[1, 0]),
                           helper.make_node("Reshape", [f"{op.y}::flat_out", op.y_shape], [op.y])]
    return {name: numpy_helper.from_array(value, name) for name, value in constants.items()}


def _wire(segments: list[Segment], graph_outputs: list[str], initializers: set[str], pruned: list[PrunedMatMul]) -> None:
    """Each segment's inputs (read, made elsewhere) and outputs (made, read later or returned)."""
    needed_after = {name: -1 for name in graph_outputs}  # name -> last segment reading it
    for index, segment in enumerate(segments):
        for node in segment.nodes:
            for name in node.input:
                if name and name not in initializers:
                    needed_after[name] = max(needed_after.get(name, -1), index)
    for op in pruned:  # the kernel reads x_t after its stage's segment: as if the next one did
        needed_after[op.x_t] = max(needed_after.get(op.x_t, -1), op.stage + 1)
    for index, segment in enumerate(segments):
        made_here = {name for node in segment.nodes for name in node.output}
        reads = [name for node in segment.nodes for name in node.input
                 if name and name not in initializers and name not in made_here]
        segment.inputs = list(dict.fromkeys(reads))
        segment.outputs = [name for name in dict.fromkeys(n for node in segment.nodes for n in node.output)
                           if name in graph_outputs or needed_after.get(name, -1) > index]


def _segment_model(model, segment: Segment, types: dict, initializers: dict, extra: dict):
    from onnx import TensorProto, helper

    used = {name for node in segment.nodes for name in node.input}
    inits = [init for name, init in {**initializers, **extra}.items() if name in used]

    def info(name):  # dtype only: the sessions take any batch size and sequence length
        return helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None)

    graph = helper.make_graph(segment.nodes, "segment", [info(n) for n in segment.inputs],
                              [info(n) for n in segment.outputs], inits)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _value_types(model, pruned: list[PrunedMatMul]) -> dict:
    from onnx import TensorProto, shape_inference

    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for op in pruned:
        types.update({op.x_t: TensorProto.FLOAT, op.y_t: TensorProto.FLOAT, op.y_shape: TensorProto.INT64})
    return types


class SparseGraph:
    """The ONNX model at ``path`` as dense ONNX Runtime segments and pruned MatMuls on the
    kernel, each on ``threads`` threads (None: all cores)."""

    def __init__(self, path: Path, threads: int | None = None, min_sparsity: float = CSR_MIN_SPARSITY):
        import onnx
        import onnxruntime

        from sparsebert.hardware import physical_cores

        model = onnx.load(str(path))
        self.kernel_threads = threads or physical_cores()
        self.segments, self.pruned = split(model, min_sparsity)
        extra = _glue_nodes(self.segments, self.pruned)
        initializers = {init.name: init for init in model.graph.initializer}
        self.output_names = [o.name for o in model.graph.output]
        _wire(self.segments, self.output_names, set(initializers) | set(extra), self.pruned)
        types = _value_types(model, self.pruned)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ONNX Runtime's threads spin after each run, waiting for the next: here the kernel runs
        # next, and they took its cores (batch 1 on both of 2 cores: 4.8 items/s spinning, 63 not).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for segment in (s for s in self.segments if s.nodes):
            proto = _segment_model(model, segment, types, initializers, extra)
            segment.session = onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                                           providers=["CPUExecutionProvider"])
        self.by_stage = {}
        for op in self.pruned:
            self.by_stage.setdefault(op.stage, []).append(op)

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = dict(inputs)
        for index, segment in enumerate(self.segments):
            if segment.nodes:
                outputs = segment.session.run(segment.outputs, {name: values[name] for name in segment.inputs})
                values.update(zip(segment.outputs, outputs))
            for op in self.by_stage.get(index, ()):
                values[op.y_t] = op.weight.matmul_t(values[op.x_t], self.kernel_threads, op.bias)
        return [values[name] for name in self.output_names]


class OnnxRuntimeSparseBackend:
    """The engine table's backend: the deployment's ONNX file as a SparseGraph."""

    def __init__(self, model_dir: Path, deployment: Path, batch_size: int, sequence_length: int,
                 input_names: list[str], threads: int | None):
        self.input_names = input_names
        self.graph = SparseGraph(deployment / "model.onnx", threads)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.graph({n: inputs[n] for n in self.input_names})[0]

    def close(self) -> None:
        pass


class PipelineEngine:
    """What a DeepSparse pipeline calls as its engine (``sparsebert serve``): the inputs as a
    list in the graph's order, the outputs as a list."""

    def __init__(self, onnx_path: Path, cores: int | None = None):
        from sparsebert.inference import onnx_input_names

        self.input_names = onnx_input_names(Path(onnx_path))
        self.graph = SparseGraph(Path(onnx_path), cores)

    def __call__(self, inputs: list[np.ndarray], val_inp: bool = True) -> list[np.ndarray]:
        return self.graph(dict(zip(self.input_names, inputs)))
