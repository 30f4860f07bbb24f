"""Every shipped recipe loads as SparseML will read it; bad recipes fail with one clear error."""

from pathlib import Path

import pytest

from sparsebert.recipe import RecipeError, check_recipe, parse_recipe_args, recipe_path

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    names = [type(m).__name__ for m in check_recipe(path, {})]
    assert "SparseBertDistillationModifier" in names
    # distill.yaml (the small dense students of the sparse-vs-small comparison) prunes nothing;
    # sparsebert-int8.yaml holds a pruned student's zeros and quantizes it.
    pruning = set(names) & {"GMPruningModifier", "OBSPruningModifier", "ConstantPruningModifier"}
    expected = {"distill.yaml": set(), "sparsebert-int8.yaml": {"ConstantPruningModifier"},
                "sparsebert-obs.yaml": {"OBSPruningModifier"}}.get(path.name, {"GMPruningModifier"})
    assert pruning == expected
    assert ("QuantizationModifier" in names) == (path.name == "sparsebert-int8.yaml")


def test_schedule_and_ranking_are_recipe_variables():
    args = {"num_epochs": 10, "prune_start_fraction": 0.1, "prune_end_fraction": 0.5, "mask_updates": 20,
            "global_ranking": True}
    pruning = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert"), args)}["GMPruningModifier"]
    assert (pruning.start_epoch, pruning.end_epoch, pruning.update_frequency) == (1.0, 5.0, 0.2)
    assert pruning.global_sparsity is True


def test_second_order_variant_keeps_the_method_but_the_ranking():
    obs = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert-obs"), {"num_gradients": 16})}
    magnitude = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert"), {})}
    pruning, reference = obs["OBSPruningModifier"], magnitude["GMPruningModifier"]
    assert pruning.num_grads == 16 and pruning.fisher_block_size == 50
    assert (pruning.params, pruning.final_sparsity, pruning.inter_func, pruning.end_epoch) == \
        (reference.params, reference.final_sparsity, reference.inter_func, reference.end_epoch)
    distill = obs["SparseBertDistillationModifier"]
    assert distill.logits_weight == distill.hidden_weight == distill.attention_weight == 1.0


def test_sparsebert_recipe_encodes_the_method():
    modifiers = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert"), {"num_epochs": 10})}
    pruning = modifiers["GMPruningModifier"]
    assert pruning.final_sparsity == 0.95 and pruning.init_sparsity == 0.0
    assert pruning.inter_func == "cubic" and pruning.global_sparsity is False
    assert pruning.mask_type == "unstructured"
    # about 100 mask updates over the pruning window
    updates = (pruning.end_epoch - pruning.start_epoch) / pruning.update_frequency
    assert 95 <= updates <= 105
    distill = modifiers["SparseBertDistillationModifier"]
    assert (distill.hardness, distill.temperature) == (1.0, 1.0)
    assert distill.logits_weight == distill.hidden_weight == distill.attention_weight == 1.0


def test_recipe_args_override_without_editing():
    modifiers = {type(m).__name__: m for m in check_recipe(
        recipe_path("sparsebert"), {"final_sparsity": 0.8, "num_epochs": 4, "hidden_weight": 2.0})}
    assert modifiers["GMPruningModifier"].final_sparsity == 0.8
    assert modifiers["EpochRangeModifier"].end_epoch == 4
    assert modifiers["SparseBertDistillationModifier"].hidden_weight == 2.0


@pytest.mark.parametrize("text, message", [
    ("version: 1.1.0\nmodifiers: [\n", "malformed YAML"),
    ("version: 1.1.0\nmodifiers:\n  - !NoSuchModifier\n    start_epoch: 0\n", "invalid recipe"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        check_recipe(path, {})


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "high"])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(RecipeError, match=r"final_sparsity must be in \[0, 1\)"):
        check_recipe(recipe_path("sparsebert"), {"final_sparsity": sparsity})


def test_unknown_recipe_variable():
    with pytest.raises(RecipeError, match="unknown recipe variable"):
        check_recipe(recipe_path("sparsebert"), {"final_sparsty": 0.9})


def test_recipe_args_must_be_a_json_object():
    assert parse_recipe_args('{"num_epochs": 3}') == {"num_epochs": 3}
    with pytest.raises(RecipeError, match="not valid JSON"):
        parse_recipe_args("{num_epochs: 3")
    with pytest.raises(RecipeError, match="must be a JSON object"):
        parse_recipe_args("[1, 2]")


def test_missing_recipe():
    with pytest.raises(RecipeError, match="recipe not found"):
        recipe_path("no-such-recipe")


def test_pruning_params_must_name_the_matrices(tmp_path):
    """__ALL_PRUNABLE__ would leave nothing to measure or gate against."""
    path = tmp_path / "every.yaml"
    path.write_text("version: 1.1.0\nnum_epochs: 2.0\nmodifiers:\n"
                    "  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: eval(num_epochs)\n"
                    "  - !GMPruningModifier\n    params: __ALL_PRUNABLE__\n    init_sparsity: 0.0\n"
                    "    final_sparsity: 0.9\n    start_epoch: 0.0\n    end_epoch: 1.0\n    update_frequency: 0.1\n")
    with pytest.raises(RecipeError, match="list the matrices"):
        check_recipe(path, {})


def test_recipes_share_their_blocks_from_one_declaration():
    """The loss variables, the pruned matrices and the distillation modifier are written once
    (recipes/build.py); every shipped recipe is what the builder writes."""
    from sparsebert.families import BERT
    from sparsebert.recipes import build

    assert build.main(["--check"]) == 0, "run: python -m sparsebert.recipes.build"
    for path in RECIPES:
        text = path.read_text()
        for block in ("loss-variables", "distillation"):
            assert build.BEGIN.format(name=block) in text, (path.name, block)
    gm, obs, int8 = (check_recipe(recipe_path(name), {}) for name in ("sparsebert", "sparsebert-obs", "sparsebert-int8"))
    params = [next(m.params for m in modifiers if "Pruning" in type(m).__name__) for modifiers in (gm, obs, int8)]
    assert params[0] == params[1] == BERT.pruned_params()
    assert params[2] == BERT.pruned_params(r"(\.module)?")
    assert params[0] == [r"re:bert\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight",
                         r"re:bert\.encoder\.layer\.\d+\.attention\.output\.dense\.weight",
                         r"re:bert\.encoder\.layer\.\d+\.intermediate\.dense\.weight",
                         r"re:bert\.encoder\.layer\.\d+\.output\.dense\.weight"]


def test_a_new_loss_term_reaches_every_recipe(monkeypatch, tmp_path):
    from sparsebert.pipeline import loss_terms, modifiers
    from sparsebert.recipes import build

    l1 = loss_terms.LossTerm("logits_l1", False, lambda s, t, options: (s["logits"] - t["logits"]).abs().mean(), "L1")
    monkeypatch.setattr(loss_terms, "TERMS", (*loss_terms.TERMS, l1))
    modifiers.sync_weight_properties()
    try:
        for path in RECIPES:
            rendered = tmp_path / path.name
            rendered.write_text(build.render(path.read_text()))
            distill = next(m for m in check_recipe(rendered, {"logits_l1_weight": 0.5})
                           if type(m).__name__ == "SparseBertDistillationModifier")
            assert distill.logits_l1_weight == 0.5, path.name
    finally:
        monkeypatch.undo()
        modifiers.sync_weight_properties()


def test_unknown_shared_block_is_refused():
    from sparsebert.recipes import build

    with pytest.raises(ValueError, match="unknown shared block 'nope'"):
        build.render("# >>> shared: nope (x)\n# <<< shared: nope\n")
    # A block whose end marker went missing must not swallow what lies up to the next block's end.
    with pytest.raises(ValueError, match="2 shared blocks begin but 1 end"):
        build.render("# >>> shared: distillation (x)\nkeep_me: 1\n# >>> shared: distillation (x)\n"
                     "# <<< shared: distillation\n")


@pytest.mark.parametrize("name", ["sparsebert", "sparsebert-cyclic"])
def test_mask_type_is_a_recipe_variable_checked_before_training(name):
    pruning = {type(m).__name__: m for m in check_recipe(recipe_path(name), {"mask_type": "block4"})}
    assert pruning["GMPruningModifier"].mask_type == "block4"
    with pytest.raises(RecipeError, match="mask_type 'block7' is not one SparseML makes"):
        check_recipe(recipe_path(name), {"mask_type": "block7"})


def test_block4_second_order_pruning_needs_fisher_blocks_of_whole_groups():
    with pytest.raises(RecipeError, match="fisher_block_size must be divisible by 4"):
        check_recipe(recipe_path("sparsebert-obs"), {"mask_type": "block4"})
    pruning = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert-obs"),
                                                          {"mask_type": "block4", "fisher_block_size": 48})}
    assert pruning["OBSPruningModifier"].mask_type == "block4"


def test_int8_recipe_quantizes_the_attention_matmuls_unless_told_not_to():
    quantize = {type(m).__name__: m for m in check_recipe(recipe_path("sparsebert-int8"), {})}["QuantizationModifier"]
    assert "QATMatMul" not in quantize.ignore and "Embedding" in quantize.ignore
    linears_only = {type(m).__name__: m for m in check_recipe(
        recipe_path("sparsebert-int8"), {"not_quantized": quantize.ignore + ["QATMatMul"]})}["QuantizationModifier"]
    assert "QATMatMul" in linears_only.ignore
