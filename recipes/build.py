"""What the shipped recipes share, written once: the loss variables, the pruned matrices and the
distillation modifier. Each recipe stays a plain SparseML YAML file (SparseML's own console
script reads it as it is); the shared parts sit between marker lines

    # >>> shared: <block> (python -m sparsebert.recipes.build writes this block)
    ...
    # <<< shared: <block>

and this module rewrites what is between them. ``python -m sparsebert.recipes.build`` writes
the recipes; ``--check`` (run by the tests) fails when one differs from what it would write.
The loss terms come from ``sparsebert.pipeline.loss_terms.TERMS``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparsebert import families
from sparsebert.pipeline import loss_terms

RECIPES = Path(__file__).parent
BEGIN = "# >>> shared: {name} (python -m sparsebert.recipes.build writes this block)"
END = "# <<< shared: {name}"
_BLOCK = re.compile(r"^(?P<indent> *)# >>> shared: (?P<name>[\w-]+) .*?\n.*?^(?P=indent)# <<< shared: (?P=name)\n",
                    re.MULTILINE | re.DOTALL)

QUANTIZED = r"(\.module)?"  # where quantization-aware training wraps a linear


def loss_variables() -> list[str]:
    lines = ["# Loss weights (the paper: all 1, temperature 1). hardness weighs the distillation loss",
             "# against the task's own hard-label loss: 1.0 learns from the teacher alone, as the paper does.",
             "hardness: 1.0",
             "temperature: 1.0"]
    lines += [f"{term.weight}: 1.0  # {term.doc}" for term in loss_terms.TERMS]
    layer_terms = " and ".join(term.name for term in loss_terms.TERMS if term.per_layer)
    return lines + [
        "# hidden_normalize: each layer's hidden-state MSE divided by the teacher's variance there.",
        "# attention_scores: the attention MSE on the scores before softmax (TinyBERT's loss, which the",
        "# paper's code runs) instead of on the probabilities.",
        f"# layer_distill_end_fraction: from this fraction of training on, no {layer_terms} terms",
        "# (TinyBERT's prediction stage); 1.0 keeps them throughout.",
        "# grad_norm_every: every N steps the curve gets each term's gradient norm (0: never); 47, not",
        "# 50, so the samples do not fall on the same place of each 50-batch length-grouped megabatch.",
        "hidden_normalize: false",
        "attention_scores: false",
        "layer_distill_end_fraction: 1.0",
        "grad_norm_every: 47",
    ]


def pruned_params(module: str = "", family: families.Family = families.BERT) -> list[str]:
    """The six linears of every encoder layer (the shipped recipes: BERT's names); embeddings,
    biases, LayerNorms and the classifier are not listed, so they stay dense."""
    return [f"- {pattern}" for pattern in family.pruned_params(module)]


def distillation_modifier() -> list[str]:
    return ["- !SparseBertDistillationModifier",
            "  start_epoch: 0.0",
            "  hardness: eval(hardness)",
            "  temperature: eval(temperature)",
            *(f"  {term.weight}: eval({term.weight})" for term in loss_terms.TERMS),
            "  hidden_normalize: eval(hidden_normalize)",
            "  attention_scores: eval(attention_scores)",
            "  layer_terms_end_epoch: eval(num_epochs * layer_distill_end_fraction)",
            "  grad_norm_every: eval(grad_norm_every)"]


BLOCKS = {
    "loss-variables": loss_variables,
    "pruned-params": pruned_params,
    "pruned-params-quantized": lambda: pruned_params(module=QUANTIZED),
    "distillation": distillation_modifier,
}


def _block_text(name: str, indent: str, lines: list[str]) -> str:
    return "".join(f"{indent}{line}\n" for line in [BEGIN.format(name=name), *lines, END.format(name=name)])


def render(text: str) -> str:
    """``text`` with every shared block rewritten at its marker's indentation."""
    def block(match: re.Match) -> str:
        name, indent = match["name"], match["indent"]
        if name not in BLOCKS:
            raise ValueError(f"unknown shared block {name!r} (known: {', '.join(BLOCKS)})")
        return _block_text(name, indent, BLOCKS[name]())

    rendered, count = _BLOCK.subn(block, text)
    begins = len(re.findall(r"(?m)^ *# >>> shared: ", text))
    if count != begins:
        raise ValueError(f"{begins} shared blocks begin but {count} end as they should "
                         "(each '# >>> shared: <name>' needs its '# <<< shared: <name>' at the same indentation)")
    return rendered


def for_family(text: str, family: families.Family) -> str:
    """A recipe's text with each pruned-params block that names a family's six linears, as the
    builder writes it (BERT's in the shipped recipes), naming ``family``'s instead; a block
    edited by hand is left as it is."""
    names = {"pruned-params": "", "pruned-params-quantized": QUANTIZED}

    def block(match: re.Match) -> str:
        name, indent = match["name"], match["indent"]
        if name not in names:
            return match.group(0)
        if all(match.group(0) != _block_text(name, indent, pruned_params(names[name], other))
               for other in families.FAMILIES):
            return match.group(0)
        return _block_text(name, indent, pruned_params(names[name], family))

    return _BLOCK.sub(block, text)


def stale_recipes() -> list[Path]:
    return [path for path in sorted(RECIPES.glob("*.yaml")) if render(path.read_text()) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsebert.recipes.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a recipe is out of date")
    args = parser.parse_args(argv)
    stale = stale_recipes()
    if args.check:
        for path in stale:
            print(f"{path.name}: its shared blocks differ from what python -m sparsebert.recipes.build writes",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(render(path.read_text()))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
