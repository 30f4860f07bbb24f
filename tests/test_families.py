"""Any BERT-family model is pruned as the paper prunes BERT: the six linears of every encoder
layer, found by the family's own module names (sparsebert.families), distilled through the
family's own layer outputs and attention probabilities, exported, served and checked."""

import json

import pytest
import torch
from tiny import FAMILY_MODEL_TYPES, tiny_config, tiny_pretrained

from sparsebert import families, glue
from sparsebert.checkpoint import is_pruned, load_weights, pruned_patterns
from sparsebert.cli import main
from sparsebert.runfolder import RunFolder


def _task_model(model_type):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(tiny_config(model_type))


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_each_family_prunes_exactly_its_six_linears_a_layer(model_type):
    model = _task_model(model_type)
    family = families.of_config(model.config)
    pruned = [n for n, p in model.named_parameters() if is_pruned(n, family.pruned_params())]
    layers = 2
    assert len(pruned) == 6 * layers, pruned
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # Every pruned matrix is a linear's weight inside an encoder layer; the head stays dense.
    assert all(n.endswith(".weight") and n[:-len(".weight")] in linears for n in pruned)
    assert not any("classifier" in n or "embeddings" in n or "pooler" in n for n in pruned)
    shapes = sorted(tuple(dict(model.named_parameters())[n].shape) for n in pruned)
    assert shapes == sorted([(32, 32)] * 4 * layers + [(64, 32), (32, 64)] * layers)


def test_the_bert_table_is_the_shipped_recipes_params():
    from sparsebert.recipe import pruned_params, recipe_path

    assert pruned_params(recipe_path("sparsebert")) == families.BERT.pruned_params()


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_the_distillation_reads_each_familys_layers(model_type):
    """One hidden state and one attention-probability map per layer, plus the embeddings: the
    probabilities sum to 1 over the keys, the hidden states are the layers' outputs."""
    from sparsebert.pipeline.modifiers import _hook

    model = _task_model(model_type).eval()
    cache = {}
    handles = _hook(model, cache)
    ids = torch.randint(5, 1000, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    assert len(cache["hidden"]) == 3 and len(cache["attention"]) == 2
    for kept, returned in zip(cache["hidden"], out.hidden_states):
        torch.testing.assert_close(kept, returned)
    for probabilities in cache["attention"]:
        assert probabilities.shape == (2, 4, 9, 9)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 4, 9))


def test_a_family_whose_scores_cannot_be_rebuilt_refuses_the_attention_scores_loss():
    from sparsebert.pipeline.modifiers import _hook

    _hook(_task_model("distilbert"), {}, projections=True)  # DistilBERT's q_lin/k_lin rebuild its scores
    with pytest.raises(ValueError, match="MPNet's attention scores cannot be rebuilt"):
        _hook(_task_model("mpnet"), {}, projections=True)


def test_an_unknown_family_is_refused_before_any_training(tmp_path, glue_dir, capsys):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(folder)
    out = tmp_path / "run"
    code = main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--model", str(folder), "--out", str(out),
                 "--limit", "16"])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    message = [line for line in err.splitlines() if "gpt2" in line]
    assert message and "supported: BERT" in message[0] and "DistilBERT" in message[0] and "MPNet" in message[0]
    assert "Traceback" not in err


def test_a_recipe_edited_by_hand_is_used_as_written():
    """Only a pruned-params block as the builder writes it is rewritten for another family."""
    from sparsebert.recipe import recipe_path
    from sparsebert.recipes import build

    text = recipe_path("sparsebert").read_text()
    mpnet = families.by_model_type("mpnet")
    assert r"re:mpnet\.encoder\.layer\.\d+\.attention\.attn\.(q|k|v)\.weight" in build.for_family(text, mpnet)
    assert build.for_family(text, families.BERT) == text
    written_for_mpnet = build.for_family(text, mpnet)  # a run's recipe, reused for another family
    assert build.for_family(written_for_mpnet, families.by_model_type("distilbert")) == \
        build.for_family(text, families.by_model_type("distilbert"))
    ffn_only = text.replace(r"      - re:bert\.encoder\.layer\.\d+\.attention\.output\.dense\.weight" + "\n", "")
    assert ffn_only != text and build.for_family(ffn_only, mpnet) == ffn_only


def test_a_recipe_naming_bert_is_refused_for_a_distilbert_before_any_training(tmp_path, glue_dir, capsys):
    from sparsebert.recipe import recipe_path

    folder = tiny_pretrained("distilbert", tmp_path / "distilbert")
    text = recipe_path("sparsebert").read_text()
    own = tmp_path / "own.yaml"  # a user's recipe: BERT's names written out, no shared block to fill
    own.write_text(text.replace("# >>> shared: pruned-params", "# pruned-params").replace("# <<< shared: pruned-params", "#"))
    out = tmp_path / "run"
    code = main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--model", str(folder), "--out", str(out),
                 "--limit", "16", "--recipe", str(own)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert "names no weight of the DistilBERT model" in err and r"re:distilbert\.transformer" in err, err


@pytest.fixture(scope="module", params=FAMILY_MODEL_TYPES)
def family_run(request, glue_dir, tmp_path_factory):
    """`sparsebert train` on a tiny random model of the family (teacher, then the student pruned
    to 80% while distilled), then `sparsebert export`."""
    folder = tmp_path_factory.mktemp(f"family-{request.param}")
    model = tiny_pretrained(request.param, folder / "pretrained")
    run = folder / "run"
    assert main(["train", "--task", "mrpc", "--glue-dir", str(glue_dir), "--model", str(model), "--out", str(run),
                 "--limit", "48", "--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "16",
                 "--max-seq-length", "32", "--sparsity", "0.8", "--teacher-lr", "1e-3", "--student-lr", "1e-3"]) == 0
    assert main(["export", str(run)]) == 0
    return request.param, model, run


def test_the_student_of_each_family_reaches_its_sparsity_on_exactly_its_linears(family_run):
    model_type, pretrained, run = family_run
    family = families.by_model_type(model_type)
    student = run / "student"
    assert pruned_patterns(student) == family.pruned_params()  # the recipe it was trained with names them
    weights, before = load_weights(student), load_weights(pretrained)
    pruned = {n for n in weights if is_pruned(n, family.pruned_params())}
    assert len(pruned) == 12
    for name, weight in weights.items():
        zeros = float((weight == 0).mean())
        if name in pruned:
            assert zeros == pytest.approx(0.8, abs=0.01), name
            kept = weight != 0  # the weights kept were trained, not only masked
            start = before[name if name in before else name.split(".", 1)[1]]
            assert (weight[kept] != start[kept]).mean() > 0.9, name
        else:
            assert zeros < 0.5, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["encoder_linear_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert metrics["student"]["kept_weights_moved"] > 0.9  # the report finds the family's pre-trained weights


def test_int8_is_refused_for_a_family_whose_attention_sparseml_does_not_quantize(tmp_path, glue_dir, capsys):
    folder = tiny_pretrained("roberta", tmp_path / "roberta")
    out = tmp_path / "run"
    assert main(["train", "--task", "rte", "--glue-dir", str(glue_dir), "--model", str(folder), "--out", str(out),
                 "--limit", "16", "--int8"]) == 2
    assert "--int8 is for BERT models" in capsys.readouterr().err and not out.exists()


def test_each_familys_student_is_served_with_the_answers_of_pytorch(family_run, glue_dir):
    from sparsebert.deploy import thresholds
    from sparsebert.deploy.engines import served_engines
    from sparsebert.deploy.parity import served_parity

    model_type, _, run = family_run
    task = glue.get_task("mrpc")
    _, splits = glue.load_task(task.name, str(glue_dir))
    examples = splits["dev"][:16]
    folder = RunFolder(run)
    report = served_parity(task, run / "student", folder.deployment("student"), {"dev": examples},
                           thresholds.load()["parity"], folder.exported_length("student"))
    for engine in served_engines():
        result = report["splits"]["dev"][engine]
        assert result["answers"] == len(examples), (model_type, engine, result)
        assert result["label_mismatches"] == 0 and result["max_score_difference"] < 1e-3, (model_type, engine, result)
    assert report["passed"]
    assert main(["parity", str(run)]) == 0  # every engine against PyTorch on the run's dev rows


@pytest.mark.parametrize("model_type", ["distilbert", "mpnet"])
def test_the_shallow_student_keeps_the_first_layers_of_any_family(model_type, tmp_path):
    from transformers import AutoModel

    from sparsebert.pipeline.train import first_layers

    source = tiny_pretrained(model_type, tmp_path / "model")
    kept = AutoModel.from_pretrained(first_layers(str(source), 1, tmp_path / "shallow"))
    full = AutoModel.from_pretrained(source)
    assert len(families.encoder_layers(kept)) == kept.config.num_hidden_layers == 1
    for name, weight in kept.state_dict().items():
        torch.testing.assert_close(weight, full.state_dict()[name])
