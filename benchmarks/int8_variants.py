"""What INT8 attention matmuls and 4-block pruning buy on each engine, side by side in one run.

Speed depends on where the zeros are and on which ops run on integers, not on the weights'
values, so every variant is made from the same pre-trained model without training:

- its six encoder linears of every layer pruned by magnitude, each matrix to ``--sparsity`` on
  its own, by SparseML's own mask creator: ``unstructured`` (the paper) or ``block4`` (whole
  groups of 4 neighbouring inputs, the pattern DeepSparse's INT8 kernels favour);
- each pruned model made INT8 by the INT8 recipe's quantization (scales observed on random
  batches, as ``bench --bert-base`` does): the linears alone (``not_quantized`` plus QATMatMul)
  or the linears and both attention matmuls (the recipe's default).

Each is exported as a trained student is and timed at batch 1, ``--sequence-length`` tokens, on
dense-baseline ONNX Runtime and DeepSparse; every ratio is against the dense model on ONNX Runtime,
with the FLOP bound beside it (docs/int8/variants.md). What each variant costs in accuracy needs
training: docs/results.md, "INT8 attention matmuls and 4-block pruning".

    python benchmarks/int8_variants.py [--model DIR] [--sparsity 0.95] [--threads 1] [--seconds 5] \\
        [--cache runs/int8-variants] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsebert import offline, sparseml_mends

offline.configure()
sparseml_mends.apply()

def pruned_copy(source: str, folder: Path, sparsity: float, mask_type: str) -> None:
    """``source`` as a two-label classifier, its recipe's pruned matrices cut to ``sparsity`` by
    magnitude with SparseML's mask creator for ``mask_type``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsebert.deploy.bench import prune_by_magnitude

    torch.manual_seed(0)  # the new classifier head
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).eval()
    prune_by_magnitude(model, sparsity, mask_type)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def variants(source: str, family: str, cache: Path, sparsity: float, sequence_length: int):
    from sparsebert.deploy import bench

    dense = cache / "dense"
    bench.build_once(dense, sequence_length, lambda checkpoint: pruned_copy(source, checkpoint, 0.0, "unstructured"))
    models = [bench.Model(family, "dense", dense / "checkpoint", dense / "deployment")]
    for mask_type in ("unstructured", "block4"):
        name = f"sparse {sparsity:.0%}" + ("" if mask_type == "unstructured" else f" {mask_type}")
        pruned = cache / f"{mask_type}-{round(sparsity * 100)}"
        bench.build_once(pruned, sequence_length,
                         lambda checkpoint, m=mask_type: pruned_copy(source, checkpoint, sparsity, m))
        models.append(bench.Model(family, name, pruned / "checkpoint", pruned / "deployment"))
        for suffix, args in (("INT8 linears", bench.int8_linears_only()), ("INT8", None)):
            folder = pruned.with_name(f"{pruned.name}-{suffix.lower().replace(' ', '-')}")
            bench.build_once(folder, sequence_length, lambda checkpoint, a=args: bench.quantized_copy(
                pruned / "checkpoint", checkpoint, sequence_length, recipe_args=a))
            models.append(bench.Model(family, f"{name} {suffix}", folder / "checkpoint", folder / "deployment",
                                      precision="int8"))
    return models


def main(argv=None) -> int:
    from sparsebert.deploy import bench
    from sparsebert.models import DEFAULT_MODEL, embedded_default

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a BERT folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cache", type=Path, default=Path("runs/int8-variants"), help="built models, kept and reused")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    family = Path(args.model).name if args.model else DEFAULT_MODEL
    models = variants(str(args.model or embedded_default()), family, args.cache, args.sparsity, args.sequence_length)
    report = bench.benchmark(models, [1], args.sequence_length, args.seconds, engines=["onnxruntime", "deepsparse"],
                             threads=[args.threads])
    print(bench.markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
