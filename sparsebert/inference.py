"""One path from text to logits to answers, used by every stage: the training report, export's
self-check, parity (engines and the served model) and the benchmark.

Input names are read from the model (the ONNX graph's inputs, or the tokenizer's
``model_input_names`` that the PyTorch model's ``forward`` takes), never assumed: BERT takes
``token_type_ids``, DistilBERT and RoBERTa do not.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from sparsebert import checkpoint
from sparsebert.errors import UserError

# What a served answer calls the value of a regression model (STS-B similarity, 0-5).
REGRESSION_LABELS = {"stsb": "similarity"}
# Each text is cut to this many characters per token of the sequence length before it is
# tokenized, served or not: a fast tokenizer truncating a long pair builds every combination of
# the two texts' overflow windows (1.7 s for two 4,000-character CJK texts at 128 tokens, against
# 48 ms cut to 1,024). At 8 the cut changed the kept tokens of none of the 6,285 CoLA, MRPC, RTE,
# SST-2 and STS-B dev texts at 32, 64 or 128 tokens (at 6, 11 of them at 32), but a pair of two
# long texts may keep one token more of one and one less of the other; docs/serving.md.
CHARS_PER_TOKEN = 8


class InferenceError(UserError):
    pass


def sentences(examples: list[dict]) -> tuple[list[str], list[str] | None]:
    """The first sentences of GLUE examples, and the second ones for a pair task."""
    first = [e["sentence1"] for e in examples]
    second = [e["sentence2"] for e in examples] if examples and "sentence2" in examples[0] else None
    return first, second


def as_sequences(examples: list[dict]) -> list:
    """The served request's ``sequences`` for GLUE examples: texts, or [sentence1, sentence2] pairs."""
    first, second = sentences(examples)
    return first if second is None else [[a, b] for a, b in zip(first, second)]


def char_limit(sequence_length: int) -> int:
    """The characters of a text read for ``sequence_length`` tokens (see CHARS_PER_TOKEN)."""
    return CHARS_PER_TOKEN * sequence_length


def cut_text(text: str, sequence_length: int) -> str:
    """``text`` cut where the server cuts it before tokenizing, for ``sequence_length`` tokens."""
    return text[:char_limit(sequence_length)]


def onnx_input_names(onnx_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def torch_input_names(model, tokenizer) -> list[str]:
    """The tokenizer's outputs that the PyTorch model's ``forward`` takes, in the tokenizer's order."""
    accepted = set(inspect.signature(model.forward).parameters)
    return [name for name in tokenizer.model_input_names if name in accepted]


def encode(tokenizer, examples: list[dict], input_names: list[str], max_length: int,
           fixed_length: bool, served_length: int | None = None) -> dict[str, np.ndarray]:
    """int64 inputs named as the model names them, truncated to ``max_length`` tokens and padded
    to it (``fixed_length``: a fixed-shape ONNX graph) or to the longest row. Each text is first
    cut as the server cuts it for ``served_length`` tokens (default ``max_length``; a server's
    longest bucket when a shorter one is encoded), so parity measures what is served."""
    first, second = sentences(examples)
    first = [cut_text(text, served_length or max_length) for text in first]
    second = second and [cut_text(text, served_length or max_length) for text in second]
    encoded = tokenizer(first, second, truncation=True, max_length=max_length,
                        padding="max_length" if fixed_length else True, return_tensors="np")
    missing = [name for name in input_names if name not in encoded]
    if missing:
        raise InferenceError(f"the model takes inputs {missing} that its tokenizer does not make "
                             f"(it makes {sorted(encoded.keys())})")
    return {name: encoded[name].astype(np.int64) for name in input_names}


def is_regression(config) -> bool:
    """A regression head: so marked, or one output with no problem type (Hugging Face trains a
    one-label model as a regression, and a sigmoid over it answers nothing meaningful)."""
    problem = getattr(config, "problem_type", None)
    return problem == "regression" or (problem is None and config.num_labels == 1)


def label_names(id2label: dict | None, where: str) -> dict[int, str]:
    """``id2label`` after checking it names the labels (a served answer and every metric go
    through it); Hugging Face's placeholders (``LABEL_0``, ``0``) are refused."""
    labels = {int(k): str(v) for k, v in (id2label or {}).items()}
    placeholders = [v for k, v in labels.items() if v in (str(k), f"LABEL_{k}")]
    if not labels or placeholders:
        raise InferenceError(f"{where} has no real label names (id2label {labels}); export from a "
                             "run of `sparsebert train`, which names them")
    return labels


def answers(logits: np.ndarray, config) -> tuple[list[str], list[float]]:
    """What the server answers for these logits: the label and its probability (softmax), or
    for a regression model its one label and the predicted value on the task's own scale."""
    names = label_names(config.id2label, "the model config")
    if is_regression(config):
        return [names[0]] * len(logits), [float(v) for v in logits[:, 0]]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    best = probabilities.argmax(axis=1)
    return [names[int(i)] for i in best], [float(probabilities[r, i]) for r, i in enumerate(best)]


# In the saved state of a quantized attention matmul (SparseML's quantizable self-attention:
# attention_scores_matmul, context_layer_matmul).
QUANTIZED_ATTENTION = "_matmul.input_quant_stubs"


def load_classifier(model_dir: Path):
    """The checkpoint's model in eval mode, whatever training made it.

    A QAT checkpoint (``sparsebert train --int8``) saves its linears wrapped for fake
    quantization (``...dense.module.weight`` and observer state). Hugging Face's loader would
    skip those names and leave the linears at random values without failing, and SparseML 1.8's
    text-classification loader neither applies the checkpoint's recipe nor looks for QAT state
    in safetensors files; so the recipe's structure is applied here first, then every saved
    tensor is loaded strictly: a missing or unexpected one is an error, never a guess. The
    observers are switched off so that evaluating never moves a scale.
    """
    from transformers import AutoModelForSequenceClassification

    if not checkpoint.is_quantized(model_dir):
        model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
        if info["missing_keys"]:
            raise InferenceError(f"{model_dir}: weights missing from the checkpoint {info['missing_keys'][:3]} "
                                 "would start at random values")
        return model.eval()
    import math

    from sparseml.pytorch.optim import ScheduledModifierManager
    from torch.ao.quantization import disable_observer
    from transformers import AutoConfig

    recipe = Path(model_dir) / "recipe.yaml"
    if not recipe.is_file():
        raise InferenceError(f"{model_dir} holds a quantized (QAT) checkpoint but no recipe.yaml to "
                             "rebuild its structure from")
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir))
    state = checkpoint.saved_tensors(model_dir)
    manager = ScheduledModifierManager.from_yaml(str(recipe))
    ignored = {name for m in manager.iter_modifiers() for name in (getattr(m, "ignore", None) or [])}
    # Training rewrote the attention for quantizable matmuls (sparseml_mends.quantizable) since
    # the rewrite reached classifiers: its quantized state is saved, or its recipe names the
    # rewrite's matmuls to leave in FP32. An INT8 checkpoint from before has neither.
    if any(QUANTIZED_ATTENTION in name for name in state) or \
            any(name == "QATMatMul" or name.endswith("_matmul") for name in ignored):
        from sparsebert.sparseml_mends import quantizable

        model = quantizable(model)
    try:
        manager.apply_structure(model, epoch=math.inf)
    except ValueError as e:
        raise InferenceError(f"{model_dir}: its recipe.yaml does not fit the model: {str(e).splitlines()[0]}") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InferenceError(f"{model_dir}: its weights do not fit the structure its recipe.yaml builds "
                             f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.apply(disable_observer)
    return model.eval()


def load_torch(model_dir: Path, tokenizer_dir: Path | None = None):
    """(model in eval mode, tokenizer, input names) of a checkpoint folder; the tokenizer from
    ``tokenizer_dir`` when given (a deployment's, which is what its server tokenizes with)."""
    from transformers import AutoTokenizer

    model = load_classifier(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    return model, tokenizer, torch_input_names(model, tokenizer)


def torch_logits(model_dir: Path, examples: list[dict], max_length: int = 128, batch_size: int = 64,
                 tokenizer_dir: Path | None = None, device: str | None = None,
                 progress: str | None = None) -> np.ndarray:
    """PyTorch logits of a checkpoint for GLUE examples (batched, each batch padded to its longest
    row), on ``device`` (default: a GPU when present); ``progress`` names a progress bar."""
    import torch

    model, tokenizer, names = load_torch(model_dir, tokenizer_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    outputs = []
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch")
    with torch.inference_mode():
        for start in starts:
            inputs = encode(tokenizer, examples[start:start + batch_size], names, max_length, fixed_length=False)
            logits = model(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}).logits
            outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, model.config.num_labels), np.float32)
