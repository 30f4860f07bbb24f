"""SparseML 1.8's bugs on the training path, each through SparseML's real trainer with the
project's recipe, and DeepSparse 1.8's on the serving path (sparsebert.sparseml_mends mends
them). Without the mends the student's optimizer applied a learning rate of 0 for the whole run
while the log showed a schedule, and an STS-B model was served on a 0-1 scale."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from sparseml.transformers.sparsification import Trainer
from sparseml.transformers.sparsification.training_args import TrainingArguments
from transformers import TrainerCallback

from sparsebert.pipeline.curve import scheduled_optimizer, stepping_optimizer
from sparsebert.recipe import recipe_path
from tiny import batch, dataset, tiny_bert

PEAK_LR = 1e-3


class RecordLearningRates(TrainerCallback):
    """Before every optimizer step: the LR the stepping optimizer will apply, and the LR the
    scheduler (what the Trainer logs) believes in."""

    def __init__(self):
        self.trainer, self.applied, self.scheduled = None, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.applied.append(stepping_optimizer(self.trainer.optimizer).param_groups[0]["lr"])
        self.scheduled.append(self.trainer.lr_scheduler.get_last_lr()[0])


def train(out: Path, model_state_path: Path, epochs=2, accumulation=1, examples=64, prune_end_fraction=0.6,
          recipe="sparsebert", save_steps=None, resume=None, **recipe_args):
    student, teacher = tiny_bert(0), tiny_bert(1).eval()
    saving = dict(save_strategy="steps", save_steps=save_steps, group_by_length=True) if save_steps else {}
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs, learning_rate=PEAK_LR, warmup_ratio=0.25, lr_scheduler_type="linear",
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        **({"save_strategy": "no"} | saving))
    trainer = Trainer(model=student, model_state_path=str(model_state_path), recipe=str(recipe_path(recipe)),
                      recipe_args={"num_epochs": epochs, "final_sparsity": 0.8, "prune_end_fraction": prune_end_fraction,
                                   **recipe_args},
                      teacher=teacher, args=args,
                      train_dataset=dataset(examples))
    recorder = RecordLearningRates()
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model()
    trainer.save_state()
    trainer.save_optimizer_and_scheduler(str(out))
    return trainer, recorder, before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mends")
    return folder, *train(folder / "run", model_state_path=folder)


def test_applied_learning_rate_follows_the_schedule(trained):
    _, trainer, recorder, _ = trained
    assert type(stepping_optimizer(trainer.optimizer)) is torch.optim.AdamW  # unwrapped to the one that steps
    applied, scheduled = recorder.applied, recorder.scheduled
    assert len(applied) == 16  # 64 examples / batch 8, 2 epochs
    assert applied == pytest.approx(scheduled, abs=1e-12)  # the log tells the truth
    peak = applied.index(max(applied))
    assert max(applied) == pytest.approx(PEAK_LR, rel=0.25)  # warm-up reached the peak
    assert all(lr > 0 for lr in applied[1:])  # non-zero once warm-up has started
    assert all(a > b for a, b in zip(applied[peak:], applied[peak + 1:]))  # then decays


def test_kept_weights_move_and_the_classifier_learns(trained):
    _, trainer, _, before = trained
    model = trainer.model
    query = model.bert.encoder.layer[0].attention.self.query.weight.detach()
    kept = query != 0
    assert (query == 0).float().mean().item() == pytest.approx(0.8, abs=0.01)
    moved = (query[kept] != before["bert.encoder.layer.0.attention.self.query.weight"][kept]).float().mean()
    assert moved.item() > 0.5
    assert not torch.equal(model.classifier.bias.detach(), before["classifier.bias"])


def test_saved_optimizer_state_holds_adam_moments(trained):
    folder, trainer, _, _ = trained
    state = torch.load(folder / "run" / "optimizer.pt", weights_only=False)
    trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert len(state["state"]) == trainable
    assert all("exp_avg" in s and s["exp_avg"].abs().sum() > 0 for s in state["state"].values())


def test_training_curve_records_what_was_applied(trained):
    folder, _, recorder, _ = trained
    history = json.loads((folder / "run" / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in history if "loss" in e]
    assert len(steps) == 16
    assert [e["applied_learning_rate"] for e in steps] == pytest.approx(recorder.applied, abs=1e-12)
    assert steps[0]["sparsity"] < 0.5 and steps[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    for e in steps:
        assert e["distillation_loss"] == pytest.approx(e["logits_loss"] + e["hidden_loss"] + e["attention_loss"], rel=1e-4)


def test_new_run_from_a_trained_folder_starts_a_fresh_schedule(trained, tmp_path):
    """SparseML's trainer loaded optimizer.pt/scheduler.pt from the *model* folder, so a run
    starting from a fine-tuned folder resumed its finished schedule at a learning rate near 0."""
    folder, _, first, _ = trained
    assert (folder / "run" / "scheduler.pt").is_file()
    _, again, _ = train(tmp_path / "again", model_state_path=folder / "run")
    assert again.applied == pytest.approx(first.applied, abs=1e-12)


def recipe_epoch(trainer) -> float:
    """The epoch SparseML's recipe believes it is at (its optimizer wrapper's count)."""
    return vars(scheduled_optimizer(trainer.optimizer))["_wrapper"].wrapped_epoch


def test_gradient_accumulation_keeps_schedule_and_pruning_in_step(tmp_path):
    """72 examples in batches of 8 are 9 batches: the trainer takes 9 // 2 = 4 optimizer steps
    per epoch, SparseML counted ceil(72 / 16) = 5, so its recipe ran 20% slow and a pruning
    window ending at 90% of training never reached its target."""
    trainer, recorder, _ = train(tmp_path / "acc", model_state_path=tmp_path, accumulation=2, examples=72,
                                 prune_end_fraction=0.9)
    assert trainer.state.global_step == 8  # optimizer steps, not micro-batches
    assert recorder.applied == pytest.approx(recorder.scheduled, abs=1e-12)
    # The recipe's schedule ends when the trainer stops (without the mend: 8 / 5 = 1.6 of 2 epochs).
    assert recipe_epoch(trainer) == pytest.approx(trainer.args.num_train_epochs)
    for layer in trainer.model.bert.encoder.layer:
        assert (layer.output.dense.weight == 0).float().mean().item() == pytest.approx(0.8, abs=0.01)


def test_saved_recipe_reads_back_with_its_params(trained):
    """The saved recipe.yaml once held the params as Python's str of a list: read back, every
    re: pattern had doubled backslashes and matched no parameter."""
    from sparsebert.checkpoint import is_pruned
    from sparsebert.recipe import pruning_targets

    folder, trainer, _, _ = trained
    (patterns, target, _), = pruning_targets(folder / "run" / "recipe.yaml")
    assert target == 0.8
    names = [n for n, _ in trainer.model.named_parameters() if is_pruned(n, patterns)]
    assert len(names) == 6 * 2 and all(n.endswith("weight") for n in names)


def test_offline_accuracy_metric_is_not_fetched(monkeypatch):
    from sparseml.transformers import text_classification

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert text_classification.load_metric("accuracy") is None
    with pytest.raises(Exception):
        text_classification.load_metric("no-such-metric-anywhere")


def test_regression_labels_are_read(tmp_path):
    """``_get_label_info`` raised UnboundLocalError for a float label column (STS-B)."""
    from types import SimpleNamespace

    from sparseml.transformers import text_classification

    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.5, 4.2]})})
    for task_name in (None, "stsb"):
        info = text_classification._get_label_info(SimpleNamespace(label_column_name="label", task_name=task_name), raw)
        assert info[0] is True and info[2] is None and info[3] == 1
    classes = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"label": ["no", "yes", "no"]})})
    info = text_classification._get_label_info(SimpleNamespace(label_column_name="label", task_name=None), classes)
    assert info[0] is False and info[2] == ["no", "yes"]


def _text_classification_stub(problem_type, id2label):
    """What ``TextClassificationPipeline.process_engine_outputs`` reads of the pipeline."""
    from types import SimpleNamespace

    from deepsparse.transformers.pipelines.text_classification import TextClassificationOutput

    config = SimpleNamespace(num_labels=len(id2label), problem_type=problem_type, id2label=id2label)
    return SimpleNamespace(config=config, _top_k=1, top_k=1, output_schema=TextClassificationOutput)


def test_deepsparse_regression_answers_the_raw_prediction():
    """DeepSparse applied a sigmoid to a one-output model: STS-B's 3.7 was served as 0.976."""
    import numpy

    from deepsparse.transformers.pipelines.text_classification import TextClassificationPipeline

    process = TextClassificationPipeline.process_engine_outputs
    regression = _text_classification_stub("regression", {0: "similarity"})
    output = process(regression, [numpy.array([[3.7], [0.2]], dtype=numpy.float32)])
    assert output.labels == ["similarity", "similarity"]
    assert output.scores == pytest.approx([3.7, 0.2], abs=1e-6)
    classification = _text_classification_stub(None, {0: "entailment", 1: "not_entailment"})
    output = process(classification, [numpy.array([[0.0, 1.0]], dtype=numpy.float32)])
    assert output.labels == ["not_entailment"]
    assert output.scores == pytest.approx([1 / (1 + numpy.exp(-1.0))])  # softmax of (0, 1)


def test_second_order_pruning_samples_the_trainers_gradients(tmp_path):
    """recipes/sparsebert-obs.yaml: OBS's gradient sampler rebuilt Accelerate's dataloader from its
    attributes and stopped at the first mask update (TypeError); it now prunes to the target."""
    trainer, _, before = train(tmp_path / "run", tmp_path, recipe="sparsebert-obs",
                               num_gradients=4, fisher_block_size=16, mask_updates=4)
    for layer in trainer.model.bert.encoder.layer:
        query = layer.attention.self.query.weight
        assert (query == 0).float().mean().item() == pytest.approx(0.8, abs=0.01)
    kept = trainer.model.bert.encoder.layer[0].attention.self.query.weight != 0
    moved = trainer.model.bert.encoder.layer[0].attention.self.query.weight[kept] != \
        before["bert.encoder.layer.0.attention.self.query.weight"][kept]
    assert moved.float().mean().item() > 0.5


QAT_RECIPE = """version: 1.1.0
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.0
    scheme:
      input_activations: {num_bits: 8, symmetric: false}
      weights: {num_bits: 8, symmetric: true}
    ignore: [LayerNorm, Embedding, BertEmbeddings, Tanh, GELUActivation, Dropout, classifier]
"""


def test_quantization_modifier_makes_the_linears_fake_quantized(tmp_path):
    """SparseML's QuantizationModifier stopped at once: torch's QConfig has __slots__ and SparseML
    tags it with an attribute (AttributeError). Mended, the encoder linears train fake-quantized."""
    from sparseml.pytorch.optim import ScheduledModifierManager
    from torch.ao.quantization import FakeQuantize, QuantWrapper

    (tmp_path / "qat.yaml").write_text(QAT_RECIPE)
    model, inputs = tiny_bert(0), batch()
    model.eval()
    fp32 = model(**inputs).logits.detach()
    ScheduledModifierManager.from_yaml(str(tmp_path / "qat.yaml")).initialize(model, epoch=0.0)
    linears = [layer.output.dense for layer in model.bert.encoder.layer]
    assert all(isinstance(linear, QuantWrapper) for linear in linears)
    assert any(isinstance(m, FakeQuantize) for m in linears[0].modules())
    assert linears[0].qconfig.quantization_scheme is not None  # the tag SparseML could not set
    pickle.loads(pickle.dumps(linears[0].qconfig))
    model.train()
    model(**inputs).loss.backward()  # observers calibrate on a training pass
    assert linears[0].module.weight.grad.abs().sum() > 0
    model.eval()
    int8 = model(**inputs).logits.detach()
    assert 0 < (int8 - fp32).abs().max() < 0.1  # rounded to 8 bits: close to, not equal to, FP32


def _tiny_qat_checkpoint(folder):
    """A tiny BERT classifier after a QAT step, saved as training saves one: safetensors with the
    wrapped names (``...dense.module.weight``) and the recipe beside it."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    folder.mkdir()
    (folder / "recipe.yaml").write_text(QAT_RECIPE)
    model, inputs = tiny_bert(0), batch()
    ScheduledModifierManager.from_yaml(str(folder / "recipe.yaml")).initialize(model, epoch=0.0)
    model.train()
    model(**inputs).loss.backward()  # observers calibrate
    model.save_pretrained(folder)
    return folder, model.eval(), inputs


def test_sparseml_export_loads_a_qat_checkpoint_with_its_structure(tmp_path):
    """SparseML's export loader ignored the recipe and missed QAT state in safetensors: the
    quantized linears came back as plain Linears at random values, silently."""
    from sparseml.transformers.utils.load_task_model import load_task_model
    from torch.ao.quantization import QuantWrapper
    from transformers import AutoConfig

    folder, trained, inputs = _tiny_qat_checkpoint(tmp_path / "qat")
    model = load_task_model("text-classification", str(folder), AutoConfig.from_pretrained(folder))
    assert isinstance(model.bert.encoder.layer[0].output.dense, QuantWrapper)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, trained(**inputs).logits, atol=1e-6)


def test_sparseml_gives_a_classifier_quantizable_attention_matmuls(tmp_path):
    """SparseML registered its quantizable self-attention for BertModel alone and looks it up by
    the top module's class: a sequence classifier kept plain attention, and INT8 training left
    both attention matmuls in FP32. Mended, SparseML's loader rewrites it (same logits) and the
    QAT recipe fake-quantizes both operands of each matmul."""
    from sparseml.pytorch.optim import ScheduledModifierManager
    from sparseml.transformers import SparseAutoModel
    from torch.ao.quantization import FakeQuantize

    model, inputs = tiny_bert(0), batch()
    model.save_pretrained(tmp_path / "tiny")
    loaded = SparseAutoModel.text_classification_from_pretrained(str(tmp_path / "tiny")).eval()
    attention = loaded.bert.encoder.layer[0].attention.self
    assert type(attention).__name__ == "BertSelfAttentionWithQuantizableMatmuls"
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model.eval()(**inputs).logits, atol=1e-6)
    (tmp_path / "qat.yaml").write_text(QAT_RECIPE)
    ScheduledModifierManager.from_yaml(str(tmp_path / "qat.yaml")).initialize(loaded, epoch=0.0)
    for matmul in (attention.attention_scores_matmul, attention.context_layer_matmul):
        assert sum(isinstance(m, FakeQuantize) for m in matmul.modules()) == 3, matmul  # both operands, the product


def test_families_whose_sparseml_rewrite_is_broken_keep_their_attention(tmp_path):
    """SparseML's DistilBERT rewrite calls the QATMatMul class instead of an instance (TypeError
    in every forward): its classifier is not given it, and loads and runs as it was saved."""
    from sparseml.transformers import SparseAutoModel
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4,
                                                                 hidden_dim=64, max_position_embeddings=32)).eval()
    model.save_pretrained(tmp_path / "tiny")
    loaded = SparseAutoModel.text_classification_from_pretrained(str(tmp_path / "tiny")).eval()
    assert type(loaded.distilbert.transformer.layer[0].attention) is type(model.distilbert.transformer.layer[0].attention)
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


# ---------------------------------------------------------------- the mends are live, or nothing trains

UNHOOKED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "sparsebert._startup"]
import sparseml.pytorch.optim.optimizer  # loads unmended: the start-up hook is gone
"""


def run_unhooked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", UNHOOKED + code], capture_output=True, text=True, timeout=300)


def test_hook_marks_every_loaded_module_mended():
    from sparsebert import sparseml_mends
    import sparseml.pytorch.optim.optimizer as optimizer

    assert optimizer._sparsebert_mended
    assert optimizer.ScheduledOptimizer.state_dict.__module__ == "sparsebert.sparseml_mends"
    assert sparseml_mends.unmended() == []
    sparseml_mends.apply()  # idempotent where the hook is live


def test_a_reloaded_module_is_mended_again():
    result = subprocess.run([sys.executable, "-c", """
import importlib
import sparseml.pytorch.optim.optimizer as optimizer
importlib.reload(optimizer)
from sparsebert import sparseml_mends
print(optimizer.ScheduledOptimizer.state_dict.__module__, sparseml_mends.unmended())
"""], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "sparsebert.sparseml_mends []", result.stderr[-2000:]


def test_unmended_sparseml_is_refused_by_apply_the_modifier_and_the_cli():
    """A copy whose start-up hook is not live must fail loudly, never train at a learning rate of 0:
    the explicit apply(), the modifier every project recipe holds, and the console entry point."""
    result = run_unhooked("""
from sparsebert import sparseml_mends
print("unmended:", sparseml_mends.unmended())
try:
    sparseml_mends.apply()
except sparseml_mends.MendsNotLive as error:
    print("apply refused:", error)
from sparsebert.pipeline.modifiers import SparseBertDistillationModifier
import torch
try:
    SparseBertDistillationModifier(start_epoch=0.0).initialize(torch.nn.Linear(2, 2), distillation_teacher=torch.nn.Linear(2, 2))
except sparseml_mends.MendsNotLive:
    print("modifier refused")
from sparsebert import cli
print("cli exit", cli.main(["train", "--task", "sst2", "--glue-dir", "/nonexistent"]))
""")
    unmended_line = next(line for line in result.stdout.splitlines() if line.startswith("unmended:"))
    assert "'sparseml.pytorch.optim.optimizer'" in unmended_line, result.stderr[-2000:]
    assert "apply refused: SparseML/DeepSparse was loaded without sparsebert's mends" in result.stdout
    assert "modifier refused" in result.stdout
    assert "cli exit 2" in result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("sparsebert train: error:")]
    assert len(error_lines) == 1 and "learning rate 0" in error_lines[0]


def test_cyclic_learning_rate_stays_within_its_bounds_when_a_cycle_is_not_whole_steps():
    """mend_cyclic_learning_rate: SparseML's cyclic_linear fell below final_lr at the end of a
    19.2-step cycle, went negative under 2 steps and divided by zero at 1."""
    from sparseml.pytorch.sparsification.training.modifier_lr import LearningRateFunctionModifier

    def rates(cycle_epochs, steps=32, end=1.8):
        modifier = LearningRateFunctionModifier(lr_func="cyclic_linear", init_lr=2e-4, final_lr=2e-5,
                                                start_epoch=0.0, end_epoch=end, cycle_epochs=cycle_epochs)
        return [modifier._cyclic_linear(step / steps, steps) for step in range(int(end * steps))]

    fractional = rates(0.6)  # 19.2 steps per cycle
    assert fractional[0] == pytest.approx(2e-4) and all(2e-5 <= r <= 2e-4 for r in fractional)
    restarts = [step for step in range(1, len(fractional)) if fractional[step] > fractional[step - 1]]
    assert restarts == [20, 39]  # the first step of each new cycle
    assert all(2e-5 <= r <= 2e-4 for r in rates(1.5 / 32) + rates(1 / 32))  # no negative rate, no ZeroDivisionError
    whole = rates(0.5)  # 16 steps: restarts exactly at 16, 32, 48, falling linearly in between
    assert [step for step in range(1, len(whole)) if whole[step] > whole[step - 1]] == [16, 32, 48]
    assert whole[8] == pytest.approx(2e-4 - 0.5 * 1.8e-4)



def test_magnitude_masks_are_found_by_selection_not_by_sorting_each_matrix(monkeypatch):
    """mend_mask_threshold: every GMP mask update sorted each whole matrix to read one element
    (36.5 s of a 100 s student on 2 cores). The mended threshold selects it with kthvalue: the
    masks SparseML's own sort gives, ties included, and no sort."""
    from sparseml.pytorch.sparsification.pruning import mask_creator
    from sparseml.pytorch.utils import memory_aware_threshold  # SparseML's own, unmended

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(384, 1536, generator=generator).abs(),
               torch.randn(64, 64, generator=generator).abs().round(decimals=1)]  # many ties
    creator = mask_creator.UnstructuredPruningMaskCreator()
    with monkeypatch.context() as unmended:
        unmended.setattr(mask_creator, "memory_aware_threshold", memory_aware_threshold)
        expected = [creator.create_sparsity_masks([t], s)[0] for t, s in zip(weights, (0.8, 0.5))]

    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    for tensor, sparsity, mask in zip(weights, (0.8, 0.5), expected):
        assert torch.equal(creator.create_sparsity_masks([tensor], sparsity)[0], mask)
        assert int((mask == 0).sum()) == round(sparsity * tensor.numel())
    assert sorts == []


def test_a_recipe_of_a_fraction_of_an_epoch_trains_that_fraction(tmp_path):
    """SparseML set the trainer's epochs to the recipe's rounded up (math.ceil): a 1.5-epoch
    recipe trained 2 epochs, the rate falling over 16 steps while pruning was timed for 12."""
    trainer, recorder, _ = train(tmp_path / "frac", model_state_path=tmp_path, epochs=1.5, examples=64)
    assert trainer.state.global_step == 12  # 8 batches of 8 per epoch, 1.5 epochs
    assert recipe_epoch(trainer) == pytest.approx(1.5)
    assert recorder.applied[-1] < 0.2 * PEAK_LR  # the linear decay ends with the steps (unmended: 0.38)


def test_a_resumed_run_goes_on_with_the_recipe_and_the_data_order(tmp_path):
    """Resuming restarted SparseML's recipe at epoch 0 (its optimizer wrapper counted steps from 0,
    and neither the masks nor the modifiers' schedule were saved), and the length-grouped sampler
    drew a resumed epoch's order from another random state than the uninterrupted run's; the
    trainer's own random states could not be read back (torch >= 2.6's weights-only load).
    Resumed mid-pruning in its second epoch, a run ends with the uninterrupted run's weights."""
    from sparsebert.sparseml_mends import RECIPE_STATE, RecipeStateMissing

    whole, _, _ = train(tmp_path / "whole", model_state_path=tmp_path, epochs=3, save_steps=2)
    checkpoint = tmp_path / "whole" / "checkpoint-10"  # 8 steps an epoch; pruning ends at step 14.4
    state = torch.load(checkpoint / RECIPE_STATE, weights_only=False)
    pruning = state["modifiers"][0]
    pruned = torch.cat([(mask == 0).flatten() for mask in pruning["masks"]]).float().mean().item()
    assert state["steps"] == 10 and pruning["attributes"]["_started"] and 0.3 < pruned < 0.8  # mid-pruning
    resumed, recorder, _ = train(tmp_path / "resumed", model_state_path=tmp_path, epochs=3, resume=checkpoint)
    assert len(recorder.applied) == 14  # only the steps after the checkpoint were taken
    assert recipe_epoch(resumed) == pytest.approx(3.0)
    for name, weight in whole.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[name], weight, atol=1e-6), name

    (checkpoint / RECIPE_STATE).unlink()  # a checkpoint an unmended SparseML saved
    with pytest.raises(RecipeStateMissing, match="the recipe would start again at epoch 0"):
        train(tmp_path / "refused", model_state_path=tmp_path, epochs=3, resume=checkpoint)
