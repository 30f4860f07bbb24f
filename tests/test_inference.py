"""The one path from text to logits: input names come from the model, so a model whose
tokenizer makes no ``token_type_ids`` (DistilBERT, RoBERTa) runs on every engine; answers are
probabilities for a classifier and values on the task's scale for a regression."""

import numpy as np
import pytest
from tiny import tiny_task_checkpoint
from transformers import AutoConfig

from sparsebert import glue, inference
from sparsebert.deploy.engines import Runner, engine_names, run_batched
from sparsebert.deploy.export import export, logits_difference

EXAMPLES = [{"sentence1": "A man is playing a guitar.", "sentence2": "Someone plays music."},
            {"sentence1": "Stocks fell sharply on Monday.", "sentence2": "Markets rose to a record high."},
            {"sentence1": "The cat sat.", "sentence2": "A dog barked loudly at the mailman all morning."}]


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distilbert")
    checkpoint = tiny_task_checkpoint(glue.get_task("mrpc"), folder / "checkpoint", model_type="distilbert")
    return checkpoint, export(checkpoint, folder, sequence_length=32)


def test_a_model_without_token_type_ids_runs_on_every_engine(distilbert):
    checkpoint, deployment = distilbert
    names = inference.onnx_input_names(deployment / "model.onnx")
    assert names == ["input_ids", "attention_mask"]
    model, tokenizer, torch_names = inference.load_torch(checkpoint)
    assert torch_names == names
    inputs = inference.encode(tokenizer, EXAMPLES, names, 32, fixed_length=True)
    logits = {}
    for engine in engine_names():
        runner = Runner(engine, checkpoint, deployment, batch_size=2, sequence_length=32)
        try:
            logits[engine] = run_batched(runner, inputs)
        finally:
            runner.close()
    for engine in engine_names()[1:]:
        np.testing.assert_allclose(logits[engine], logits["pytorch"], atol=1e-4)
    dynamic = inference.torch_logits(checkpoint, EXAMPLES, max_length=32)  # padded to the longest row only
    np.testing.assert_allclose(dynamic, logits["pytorch"], atol=1e-4)
    assert logits_difference(checkpoint, deployment, 32) < 1e-4


def test_encode_refuses_an_input_the_tokenizer_does_not_make(distilbert):
    _, tokenizer, _ = inference.load_torch(distilbert[0])
    with pytest.raises(inference.InferenceError, match="token_type_ids"):
        inference.encode(tokenizer, EXAMPLES, ["input_ids", "token_type_ids"], 32, fixed_length=True)


def test_answers_are_probabilities_or_values_on_the_task_scale():
    classifier = AutoConfig.for_model("bert", num_labels=2, id2label={0: "equivalent", 1: "not_equivalent"})
    labels, scores = inference.answers(np.array([[2.0, 0.0], [0.0, 1.0]]), classifier)
    assert labels == ["equivalent", "not_equivalent"]
    assert scores == pytest.approx([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-1.0))])
    regression = AutoConfig.for_model("bert", num_labels=1, id2label={0: "similarity"}, problem_type="regression")
    assert inference.answers(np.array([[3.7], [-0.2]]), regression) == (["similarity"] * 2, pytest.approx([3.7, -0.2]))


def test_placeholder_label_names_are_refused():
    for placeholder in ({0: "LABEL_0", 1: "LABEL_1"}, {0: "0", 1: "1"}):
        config = AutoConfig.for_model("bert", num_labels=2, id2label=placeholder)
        with pytest.raises(inference.InferenceError, match="no real label names"):
            inference.label_names(config.id2label, "config.json")


def test_served_sequences_are_texts_or_pairs():
    assert inference.as_sequences([{"sentence1": "a"}, {"sentence1": "b"}]) == ["a", "b"]
    assert inference.as_sequences(EXAMPLES[:1]) == [["A man is playing a guitar.", "Someone plays music."]]
