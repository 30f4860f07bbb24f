"""Small real BERT models and batches for fast tests of the training machinery."""

import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(seed=0, layers=2, num_labels=2):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(config)


def batch(seed=1, size=4, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (size,), generator=g)}


def dataset(examples=64, length=12, seed=0):
    """A learnable toy task as a Hugging Face dataset: the label says whether token 7 occurs."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (examples, length), generator=g)
    labels = (ids == 7).any(dim=1).long()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": labels.tolist()})


def tiny_task_checkpoint(task, folder, seed=0, model_type="bert", sparsity=0.0):
    """A small random classifier (or regressor) for a GLUE task, saved with the default model's
    uncased tokenizer and the label order training gives it. Its head is scaled up so that
    answers are confident (labels are no ties) and a regression's values spread over 0-5.
    ``sparsity``: the matrices the recipe prunes (a BERT's six linears a layer) keep that share
    of zeros, the smallest weights cut, as a pruned student's."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from sparsebert.deploy.bench import prune_by_magnitude
    from sparsebert.models import embedded_default
    from sparsebert.pipeline.train import student_label_order

    torch.manual_seed(seed)
    labels = student_label_order(task) or ["LABEL_0"]
    sizes = dict(vocab_size=30522, max_position_embeddings=128, num_labels=len(labels),
                 id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    if model_type == "distilbert":
        config = DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **sizes)
        model = DistilBertForSequenceClassification(config)
        tokenizer_class = "DistilBertTokenizerFast"
    else:
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **sizes)
        model = BertForSequenceClassification(config)
        tokenizer_class = None
    if task.is_regression:
        model.config.problem_type = "regression"
    with torch.no_grad():
        head = model.classifier
        head.weight.normal_(0, 3.0)
        head.bias.fill_(2.5 if task.is_regression else 0.0)
    prune_by_magnitude(model, sparsity)
    model.save_pretrained(folder)
    source = str(embedded_default())
    tokenizer = (AutoTokenizer.from_pretrained(source) if tokenizer_class is None
                 else getattr(__import__("transformers"), tokenizer_class).from_pretrained(source))
    tokenizer.save_pretrained(folder)
    return folder
