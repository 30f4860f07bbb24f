"""The recipe's pruning and the project's distillation modifier on small real BERT models,
driven through SparseML's own modifier lifecycle."""

import copy

import pytest
import torch
from sparseml.pytorch.optim import ScheduledModifierManager

from sparsebert.checkpoint import is_pruned, pruned_patterns
from sparsebert.pipeline.loss_terms import TERMS, LossOptions, attention_scores
from sparsebert.pipeline.modifiers import SparseBertDistillationModifier, layer_map, sparsebert_distillation_loss
from sparsebert.recipe import recipe_path
from tiny import batch, tiny_bert

ONES = {term.name: 1.0 for term in TERMS}  # every loss term at weight 1, as the paper


def distill_step(modifier, student, inputs):
    outputs = student(**inputs)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    return modifier.loss_update(outputs.loss, student, optimizer, epoch=0.0, steps_per_epoch=1,
                                student_outputs=outputs, student_inputs=inputs)


def make_modifier(student, teacher, **kwargs):
    modifier = SparseBertDistillationModifier(start_epoch=0.0, **kwargs)
    modifier.initialize(student, distillation_teacher=teacher)
    return modifier


def test_student_loss_depends_on_the_teacher():
    student, inputs = tiny_bert(0), batch()
    first = distill_step(make_modifier(student, tiny_bert(1).eval()), student, inputs)
    second = distill_step(make_modifier(student, tiny_bert(2).eval()), student, inputs)
    assert first.item() != pytest.approx(second.item(), rel=1e-3)


def test_every_distillation_term_is_in_the_loss():
    student, teacher, inputs = tiny_bert(0, layers=3), tiny_bert(1, layers=3).eval(), batch()
    modifier = make_modifier(student, teacher)
    total = distill_step(modifier, student, inputs)
    terms = modifier._logged_loss_terms
    for name in ("logits_loss", "hidden_loss", "attention_loss"):
        assert terms[name].item() > 0, name
    assert total.item() == pytest.approx(sum(terms[n].item() for n in ("logits_loss", "hidden_loss", "attention_loss")), rel=1e-5)
    # embeddings + one hidden state per layer; one attention map per layer
    assert len(modifier._student_cache["hidden"]) == 4 and len(modifier._student_cache["attention"]) == 3
    # Weights move the total: drop the hidden term and the total falls by exactly that term.
    without_hidden = distill_step(make_modifier(student, teacher, hidden_weight=0.0), student, inputs)
    assert without_hidden.item() == pytest.approx(total.item() - terms["hidden_loss"].item(), rel=1e-4)


def test_attention_term_sees_probabilities_not_dropped_output():
    student = tiny_bert(0)
    student.config.attention_probs_dropout_prob = 0.5
    for layer in student.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.5
    student.train()
    modifier = make_modifier(student, tiny_bert(1).eval())
    distill_step(modifier, student, batch())
    for probabilities in modifier._student_cache["attention"]:
        assert torch.allclose(probabilities.sum(-1), torch.ones(()), atol=1e-5)


def test_identical_teacher_gives_zero_feature_loss():
    student = tiny_bert(0).eval()
    modifier = make_modifier(student, copy.deepcopy(student))
    distill_step(modifier, student, batch())
    assert modifier._logged_loss_terms["hidden_loss"].item() == pytest.approx(0.0, abs=1e-10)
    assert modifier._logged_loss_terms["attention_loss"].item() == pytest.approx(0.0, abs=1e-10)


def test_hardness_zero_keeps_only_the_task_loss():
    student, inputs = tiny_bert(0).eval(), batch()  # eval: no dropout, same loss twice
    task_loss = student(**inputs).loss
    total = distill_step(make_modifier(student, tiny_bert(1).eval(), hardness=0.0), student, inputs)
    assert total.item() == pytest.approx(task_loss.item(), rel=1e-5)


def test_student_deeper_than_teacher_is_refused():
    with pytest.raises(ValueError, match="needs 1 to as many layers as the teacher"):
        make_modifier(tiny_bert(0, layers=3), tiny_bert(1, layers=2))


def test_layer_map_is_one_to_one_or_uniform():
    assert layer_map(3, 3) == ([(0, 0), (1, 1), (2, 2), (3, 3)], [(0, 0), (1, 1), (2, 2)])
    # A 2-layer student of a 6-layer teacher learns from the teacher's layers 3 and 6.
    assert layer_map(2, 6) == ([(0, 0), (1, 3), (2, 6)], [(0, 2), (1, 5)])
    assert layer_map(1, 6) == ([(0, 0), (1, 6)], [(0, 5)])


def test_shallow_student_learns_from_the_mapped_teacher_layers():
    """A 1-layer student of a 2-layer teacher: zero feature loss exactly when its embeddings,
    its layer and its attention equal the teacher's embeddings, last layer and last attention."""
    teacher = tiny_bert(1, layers=2).eval()
    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = student.bert.encoder.layer[1:]  # keeps the teacher's last layer...
    student.config.num_hidden_layers = 1
    modifier = make_modifier(student, teacher)
    distill_step(modifier, student, batch())
    # ...but that layer now reads the embeddings rather than layer 1's output, so it differs.
    assert modifier._logged_loss_terms["hidden_loss"].item() > 0
    assert len(modifier._student_cache["hidden"]) == 2 and len(modifier._teacher_cache["hidden"]) == 3
    same = {"hidden": [modifier._teacher_cache["hidden"][0], modifier._teacher_cache["hidden"][2]],
            "attention": [modifier._teacher_cache["attention"][1]]}
    logits = torch.zeros(2, 2)
    terms = sparsebert_distillation_loss(same, modifier._teacher_cache, logits, logits, ONES)
    assert terms["hidden_loss"].item() == 0 and terms["attention_loss"].item() == 0
    shifted = {"hidden": modifier._teacher_cache["hidden"][:2], "attention": modifier._teacher_cache["attention"][:1]}
    terms = sparsebert_distillation_loss(shifted, modifier._teacher_cache, logits, logits, ONES)
    assert terms["hidden_loss"].item() > 0 and terms["attention_loss"].item() > 0


@pytest.mark.parametrize("kwargs", [{"hardness": 1.5}, {"temperature": 0.0}, {"hidden_weight": -1.0},
                                    {"hiden_weight": 1.0}])
def test_bad_modifier_arguments(kwargs):
    with pytest.raises(ValueError, match="SparseBertDistillationModifier"):
        SparseBertDistillationModifier(**kwargs)


def test_recipe_prunes_exactly_the_six_linears_to_target():
    """Run the shipped recipe's schedule (2 epochs x 10 steps) with SparseML's lifecycle."""
    student, teacher = tiny_bert(0), tiny_bert(1).eval()
    dense_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    manager = ScheduledModifierManager.from_yaml(str(recipe_path("sparsebert")),
                                                 recipe_variables={"num_epochs": 2, "final_sparsity": 0.9})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    steps_per_epoch = 10
    manager.initialize(student, epoch=0.0, distillation_teacher=teacher)
    student.train()
    for step in range(2 * steps_per_epoch):
        epoch = step / steps_per_epoch
        manager.update(student, optimizer, epoch, steps_per_epoch)
        inputs = batch(seed=step)
        outputs = student(**inputs)
        loss = manager.loss_update(outputs.loss, student, optimizer, epoch, steps_per_epoch,
                                   student_outputs=outputs, student_inputs=inputs)
        optimizer.zero_grad()
        loss.backward()
        manager.optimizer_pre_step(student, optimizer, epoch, steps_per_epoch)
        optimizer.step()
        manager.optimizer_post_step(student, optimizer, epoch, steps_per_epoch)
    manager.finalize(student)
    pruned = 0
    for name, param in student.named_parameters():
        zeros = (param == 0).float().mean().item()
        if is_pruned(name, pruned_patterns()):
            pruned += 1
            assert zeros == pytest.approx(0.9, abs=0.005), name  # each matrix on its own
        else:
            assert zeros < 0.01, name  # embeddings, biases, LayerNorm, pooler, classifier
            assert not torch.equal(param, dense_before[name]) or "position" in name or "token_type" in name
    assert pruned == 6 * 2


def test_hidden_normalize_divides_each_layer_by_the_teachers_variance():
    student, teacher, inputs = tiny_bert(0, layers=2), tiny_bert(1, layers=2).eval(), batch()
    modifier = make_modifier(student, teacher)
    distill_step(modifier, student, inputs)
    s, t = modifier._student_cache, dict(modifier._teacher_cache)
    # A tiny BERT's LayerNorm'd states have variance near 1: give each layer its own scale.
    t["hidden"] = [h * (layer + 2) for layer, h in enumerate(t["hidden"])]
    logits = torch.zeros(2, 2)
    plain = sparsebert_distillation_loss(s, t, logits, logits, ONES)
    scaled = sparsebert_distillation_loss(s, t, logits, logits, ONES, LossOptions(hidden_normalize=True))
    expected = sum(torch.nn.functional.mse_loss(a, b) / b.var() for a, b in zip(s["hidden"], t["hidden"]))
    assert scaled["hidden_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert scaled["hidden_loss"].item() != pytest.approx(plain["hidden_loss"].item(), rel=1e-2)
    assert scaled["attention_loss"].item() == pytest.approx(plain["attention_loss"].item())


def test_attention_scores_are_the_ones_softmax_turns_into_the_probabilities():
    """With ``attention_scores`` the attention term is TinyBERT's: MSE of q.k / sqrt(d) per head,
    0 at padded keys. Rebuilt from the hooked projections, the scores must give back the model's
    own probabilities under its mask, or the term would teach something else."""
    student, teacher, inputs = tiny_bert(0, layers=2), tiny_bert(1, layers=2).eval(), batch()
    inputs["attention_mask"][:, -3:] = 0  # three padded keys in every row
    modifier = make_modifier(student.eval(), teacher, attention_scores=True)
    distill_step(modifier, student, inputs)
    s, t = modifier._student_cache, modifier._teacher_cache
    assert s["heads"] == 4 and len(s["queries"]) == len(s["keys"]) == 2
    keep = inputs["attention_mask"][:, None, None, :].bool().expand_as(s["attention"][0])
    for layer in range(2):
        scores = attention_scores(s, layer, keep)
        assert torch.all(scores[~keep] == 0) and scores[keep].abs().sum() > 0
        rebuilt = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        assert torch.allclose(rebuilt, s["attention"][layer], atol=1e-6)
    expected = sum(torch.nn.functional.mse_loss(attention_scores(s, i, keep), attention_scores(t, i, keep))
                   for i in range(2))
    assert modifier._logged_loss_terms["attention_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    on_probabilities = sparsebert_distillation_loss(s, t, torch.zeros(4, 2), torch.zeros(4, 2), ONES)
    assert on_probabilities["attention_loss"].item() < 0.1 * expected.item()  # scores are not bounded by 1
    same = make_modifier(student, copy.deepcopy(student), attention_scores=True)
    distill_step(same, student, inputs)
    assert same._logged_loss_terms["attention_loss"].item() == pytest.approx(0.0, abs=1e-10)
    plain = make_modifier(student, teacher)  # off: the projections are not hooked nor kept
    distill_step(plain, student, inputs)
    assert plain._student_cache["queries"] == [] and plain._teacher_cache["keys"] == []


def test_logits_kl_is_the_cross_entropy_less_the_teachers_entropy():
    empty = {"hidden": [torch.zeros(1), torch.zeros(1)], "attention": [torch.zeros(1)]}
    teacher_logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    same = sparsebert_distillation_loss(empty, empty, teacher_logits, teacher_logits, ONES, LossOptions(temperature=2.0))
    assert same["logits_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["logits_loss"].item() > 0.3  # the teacher's own entropy, which no student goes under
    other = sparsebert_distillation_loss(empty, empty, -teacher_logits, teacher_logits, ONES, LossOptions(temperature=2.0))
    assert other["logits_kl"].item() > 0.1


def test_layer_terms_end_leaves_the_logits_alone():
    """TinyBERT's prediction stage: from layer_terms_end_epoch on, the loss is the logits term."""
    student, teacher, inputs = tiny_bert(0).eval(), tiny_bert(1).eval(), batch()
    modifier = make_modifier(student, teacher, layer_terms_end_epoch=1.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    for epoch, layers_on in [(0.5, True), (1.0, False), (1.5, False)]:
        outputs = student(**inputs)
        total = modifier.loss_update(outputs.loss, student, optimizer, epoch, 1,
                                     student_outputs=outputs, student_inputs=inputs)
        terms = modifier._logged_loss_terms
        logits_only = terms["logits_loss"].item()
        assert terms["hidden_loss"].item() > 0  # still measured and logged
        if layers_on:
            assert total.item() > logits_only + terms["hidden_loss"].item() * 0.99
        else:
            assert total.item() == pytest.approx(logits_only, rel=1e-6)


def test_gradient_norm_of_each_term_is_logged():
    student, teacher, inputs = tiny_bert(0), tiny_bert(1).eval(), batch()
    modifier = make_modifier(student, teacher, grad_norm_every=2, attention_weight=0.0)
    for _ in range(3):
        distill_step(modifier, student, inputs)
    assert modifier._grad_counts["logits_grad_norm"] == 2  # steps 1 and 3, not 2
    means = modifier.pop_mean_terms()
    assert means["logits_grad_norm"] > 0 and means["hidden_grad_norm"] > 0
    assert means["attention_grad_norm"] == 0  # weighted 0: it does not move the student
    assert modifier._grad_counts == {} and "logits_grad_norm" not in modifier.pop_mean_terms()  # pop clears them


def test_measuring_gradient_norms_leaves_the_update_alone():
    student, teacher, inputs = tiny_bert(0).eval(), tiny_bert(1).eval(), batch()
    grads = []
    for every in (0, 1):
        student.zero_grad()
        distill_step(make_modifier(student, teacher, grad_norm_every=every), student, inputs).backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("kwargs", [{"hidden_normalize": "yes"}, {"attention_scores": 1}, {"grad_norm_every": -1},
                                    {"grad_norm_every": 1.5}, {"layer_terms_end_epoch": "late"}])
def test_bad_new_modifier_arguments(kwargs):
    with pytest.raises(ValueError, match="SparseBertDistillationModifier"):
        SparseBertDistillationModifier(**kwargs)


def test_a_new_loss_term_is_declared_once(monkeypatch, tmp_path):
    """One LossTerm added to loss_terms.TERMS reaches the modifier's arguments and saved recipe,
    the loss, the gradient norms, curve.json and the curve's plot, with no other edit."""
    import json

    from sparsebert.pipeline import curve, loss_terms, modifiers

    l1 = loss_terms.LossTerm("logits_l1", False, lambda s, t, options: (s["logits"] - t["logits"]).abs().mean(),
                             "L1 distance of the logits")
    monkeypatch.setattr(loss_terms, "TERMS", (*loss_terms.TERMS, l1))
    modifiers.sync_weight_properties()
    try:
        student, teacher, inputs = tiny_bert(0), tiny_bert(1).eval(), batch()
        modifier = make_modifier(student, teacher, logits_l1_weight=2.0, grad_norm_every=1)
        total = distill_step(modifier, student, inputs)
        terms = modifier._logged_loss_terms
        assert terms["logits_l1_loss"].item() > 0
        others = sum(terms[t.key].item() for t in loss_terms.TERMS if t is not l1)
        assert total.item() == pytest.approx(others + 2.0 * terms["logits_l1_loss"].item(), rel=1e-5)
        assert modifier.logits_l1_weight == 2.0 and "logits_l1_weight: 2.0" in str(modifier)
        means = modifier.pop_mean_terms()
        assert means["logits_l1_grad_norm"] > 0
        history = [{"step": step, "loss": 1.0 / step, "applied_learning_rate": 1e-4, **means} for step in (1, 2)]
        (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        written = curve.write(tmp_path, "new term")
        assert "logits_l1_loss" in written[0] and "logits_l1_grad_norm" in written[0]
        assert "logits_l1_loss" in json.loads((tmp_path / "curve.json").read_text())[0]
        assert (tmp_path / "curve.png").stat().st_size > 0
        figure = curve.plot(written, "new term")
        losses_panel, _, grads_panel = figure.axes[:3]
        assert "logits_l1" in losses_panel.get_legend_handles_labels()[1]
        assert "logits_l1" in grads_panel.get_legend_handles_labels()[1]
    finally:
        monkeypatch.undo()
        modifiers.sync_weight_properties()
    assert not hasattr(SparseBertDistillationModifier, "logits_l1_weight")
