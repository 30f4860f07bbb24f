"""The FLOP bound (sparsebert.flops) against the figures worked out by hand for the default model
and BERT-base, and the bench printing each speed-up beside it."""

import pytest
import torch
from tiny import tiny_bert

from sparsebert.checkpoint import is_pruned, pruned_patterns
from sparsebert.deploy import bench
from sparsebert.flops import bound_for, forward_flops, speed_bound

MINILM = {"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12, "num_hidden_layers": 6}
FFN_ONLY_RECIPE = r"""version: 1.1.0
modifiers:
  - !GMPruningModifier
    params: ['re:bert\.encoder\.layer\.\d+\.intermediate\.dense\.weight', 're:bert\.encoder\.layer\.\d+\.output\.dense\.weight']
    init_sparsity: 0.0
    final_sparsity: 0.9
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.1
"""
BERT_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}


def test_forward_flops_split_as_counted_by_hand():
    minilm, base = forward_flops(MINILM, 128), forward_flops(BERT_BASE, 128)
    assert minilm["encoder_linears"] / 1e9 == pytest.approx(2.718, abs=1e-3)
    assert minilm["attention_matmuls"] / 1e9 == pytest.approx(0.151, abs=1e-3)
    assert base["encoder_linears"] / 1e9 == pytest.approx(21.74, abs=1e-2)
    assert base["attention_matmuls"] / 1e9 == pytest.approx(0.604, abs=1e-3)
    assert 0.02 < minilm["elementwise"] / 1e9 < 0.03


@pytest.mark.parametrize("config, sparsity, expected", [(MINILM, 0.8, 4.0), (MINILM, 0.9, 6.4), (MINILM, 0.95, 9.2),
                                                        (BERT_BASE, 0.95, 12.6)])
def test_speed_bound(config, sparsity, expected):
    assert speed_bound(config, 128, sparsity) == pytest.approx(expected, abs=0.1)
    assert speed_bound(config, 128, 0.0) == pytest.approx(1.0)
    assert speed_bound(config, 32, sparsity) > speed_bound(config, 128, sparsity)  # attention's share grows with n


def test_bound_of_a_saved_checkpoint_uses_its_measured_sparsity(tmp_path):
    model = tiny_bert(0)
    patterns = pruned_patterns()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_pruned(name, patterns):
                param.mul_(torch.rand_like(param) > 0.75)  # about 75% zeros
    model.save_pretrained(tmp_path)
    found = bound_for(tmp_path, 16)
    assert found["sparsity"] == pytest.approx(0.75, abs=0.03)
    assert found["flop_bound"] == pytest.approx(speed_bound(model.config.to_dict(), 16, found["sparsity"]))


def test_bound_counts_only_the_zeros_of_the_matrices_pruned(tmp_path):
    """A recipe that prunes the feed-forward linears alone: the attention linears' FLOPs stay."""
    model = tiny_bert(0)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for linear in (layer.intermediate.dense, layer.output.dense):
                linear.weight.zero_()
    model.save_pretrained(tmp_path)
    (tmp_path / "recipe.yaml").write_text(FFN_ONLY_RECIPE)  # what SparseML saves beside a student
    config, n = model.config.to_dict(), 16
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    dense = sum(forward_flops(config, n).values())
    expected = dense / (dense - layers * 2 * n * 2 * h * i)  # the two FFN matrices' weights, once per token
    found = bound_for(tmp_path, n)
    assert found["sparsity"] == 1.0  # of the matrices the recipe prunes
    assert found["flop_bound"] == pytest.approx(expected)
    assert found["flop_bound"] < speed_bound(config, n, 1.0) / 2  # not the six linears at 100%


def test_bench_prints_each_ratio_with_its_share_of_the_bound():
    def row(variant, engine, speed):
        return {"family": "m", "variant": variant, "engine": engine, "batch_size": 1, "threads": 1,
                "items_per_second": speed, "p50_ms": 1000 / speed, "precision": "fp32"}

    rows = [row("dense", "onnxruntime", 10.0), row("sparse 90%", "deepsparse", 30.0)]
    (ratios,) = bench.ratios(rows, {("m", "sparse 90%"): {"sparsity": 0.9, "flop_bound": 6.0}})
    assert ratios["sparse_deepsparse_vs_dense_onnxruntime"] == pytest.approx(3.0) and ratios["flop_bound"] == 6.0
    text = bench.markdown({"sequence_length": 128, "threads": [1], "rows": rows, "ratios": [ratios],
                           "machine": {"cpu": "test CPU", "cpus": 2, "cpu_features": []}})
    assert "| 6.00x (90.0%) |" in text and "3.00x (50%)" in text
