"""Model families the method knows: where each keeps the six linears of an encoder layer that
the paper prunes, and the modules its distillation reads.

Hugging Face names the same parts differently per family (BERT's ``attention.self.query`` is
DistilBERT's ``attention.q_lin`` and MPNet's ``attention.attn.q``), so one table, keyed by
``config.model_type``, says it once; the recipes' pruned params, the distillation hooks, the
sparsity measurement and the shallow-student copy all read it. A family not in the table is
refused before any training (its linears would not be pruned as the paper prunes them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sparsebert.errors import UserError


class UnknownFamily(UserError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values
    prefix: str  # the base model's attribute in a task model (base_model_prefix)
    layers: str  # the list of encoder layers, below the base model (dotted)
    linears: tuple[str, ...]  # regexes below a layer: q/k/v, attention output, FFN in, FFN out
    hidden: str  # module below a layer whose output is the layer's hidden state
    attention_probs: str  # module below a layer whose *input* is the attention probabilities
    # The attention-scores loss rebuilds q.k/sqrt(d) from these projections' outputs; None where
    # the model adds more to its scores (MPNet's relative position bias), so it cannot be rebuilt.
    query: str | None
    key: str | None
    self_attention: str  # module below a layer that holds the head count ...
    heads_attribute: str  # ... under this attribute

    def _layer(self) -> str:
        return re.escape(self.layers) + r"\.\d+\."

    def pruned_params(self, module: str = "") -> list[str]:
        """SparseML ``params`` for the six linears of every layer; ``module`` is inserted before
        ``.weight`` (``(\\.module)?`` where quantization-aware training wraps the linears)."""
        return [f"re:{re.escape(self.prefix)}\\.{self._layer()}{linear}{module}\\.weight" for linear in self.linears]

    def module_pattern(self, below_layer: str) -> re.Pattern:
        """Matches a module name (with or without the task model's prefix) ``below_layer``."""
        return re.compile(self._layer() + below_layer + "$")


_BERT_LINEARS = (r"attention\.self\.(query|key|value)", r"attention\.output\.dense",
                 r"intermediate\.dense", r"output\.dense")


def _bert_like(name: str, model_types: tuple[str, ...], prefix: str) -> Family:
    return Family(name, model_types, prefix, layers="encoder.layer", linears=_BERT_LINEARS,
                  hidden=r"output", attention_probs=r"attention\.self\.dropout",
                  query=r"attention\.self\.query", key=r"attention\.self\.key",
                  self_attention=r"attention\.self", heads_attribute="num_attention_heads")


FAMILIES = (
    _bert_like("BERT", ("bert",), "bert"),
    _bert_like("RoBERTa", ("roberta", "xlm-roberta", "camembert"), "roberta"),
    _bert_like("ELECTRA", ("electra",), "electra"),
    Family("DistilBERT", ("distilbert",), "distilbert", layers="transformer.layer",
           linears=(r"attention\.(q_lin|k_lin|v_lin)", r"attention\.out_lin", r"ffn\.lin1", r"ffn\.lin2"),
           hidden=r"output_layer_norm", attention_probs=r"attention\.dropout",
           query=r"attention\.q_lin", key=r"attention\.k_lin",  # DistilBERT scales q after q_lin
           self_attention=r"attention", heads_attribute="n_heads"),
    Family("MPNet", ("mpnet",), "mpnet", layers="encoder.layer",
           linears=(r"attention\.attn\.(q|k|v)", r"attention\.attn\.o", r"intermediate\.dense", r"output\.dense"),
           hidden=r"output", attention_probs=r"attention\.attn\.dropout", query=None, key=None,
           self_attention=r"attention\.attn", heads_attribute="num_attention_heads"),
)
BERT = FAMILIES[0]
# What a task model puts before its base model's weights (``bert.encoder...``).
PREFIXES = tuple(f.prefix for f in FAMILIES)


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def by_model_type(model_type: str | None, source: str = "the model") -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnknownFamily(f"{source} is a {model_type or 'model of no model_type'}, not a family sparsebert "
                        f"knows the encoder linears of; supported: {supported()}")


def of_config(config) -> Family:
    return by_model_type(getattr(config, "model_type", None))


def of_folder(model_dir: Path) -> Family | None:
    """The family of a saved model folder, or None where its config.json is missing or unreadable."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return by_model_type(config.get("model_type"), str(model_dir))


def of_model(name_or_path: str) -> Family:
    """The family of a model folder or hub name (its config only), refusing an unknown one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise UserError(f"--model {name_or_path}: cannot read its config ({str(error).splitlines()[0]})") from None
    return by_model_type(config.model_type, f"--model {name_or_path}")


def encoder_layers(base_model):
    """The ``nn.ModuleList`` of a base model's encoder layers."""
    family = of_config(base_model.config)
    holder = base_model
    for attribute in family.layers.split("."):
        holder = getattr(holder, attribute)
    return holder
