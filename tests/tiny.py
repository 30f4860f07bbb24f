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


# One model type per family of sparsebert.families (XLM-R and CamemBERT are RoBERTa's modules).
FAMILY_MODEL_TYPES = ("bert", "distilbert", "roberta", "mpnet", "electra")
# The tokenizer each is saved with, built from the default model's WordPiece vocabulary: a
# family whose own tokenizer makes no token_type_ids gets one that makes none either.
_TOKENIZERS = {"bert": "BertTokenizerFast", "electra": "ElectraTokenizerFast", "distilbert": "DistilBertTokenizerFast",
               "roberta": "DistilBertTokenizerFast", "mpnet": "DistilBertTokenizerFast"}


def tiny_config(model_type, **extra):
    """A 2-layer, 32-wide config of ``model_type`` over the default model's vocabulary; padding
    is token 0 there (RoBERTa and MPNet count positions from it)."""
    from transformers import AutoConfig

    if model_type == "distilbert":
        sizes = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=0)
    if model_type == "electra":
        sizes["embedding_size"] = 16  # narrower than its layers, as ELECTRA's small models are
    return AutoConfig.for_model(model_type, vocab_size=30522, max_position_embeddings=130, **sizes, **extra)


def save_tokenizer(model_type, folder):
    import transformers

    from sparsebert.models import embedded_default

    getattr(transformers, _TOKENIZERS[model_type]).from_pretrained(str(embedded_default())).save_pretrained(folder)


def tiny_pretrained(model_type, folder, seed=0):
    """A random 'pre-trained' model of ``model_type`` (its base model, no task head) and its
    tokenizer in ``folder``, as a user's local model folder is."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config(model_type)).save_pretrained(folder)
    save_tokenizer(model_type, folder)
    return folder


def tiny_task_checkpoint(task, folder, seed=0, model_type="bert", sparsity=0.0):
    """A small random classifier (or regressor) for a GLUE task, saved with the default model's
    uncased tokenizer and the label order training gives it. Its head is scaled up so that
    answers are confident (labels are no ties) and a regression's values spread over 0-5.
    ``sparsity``: the matrices the recipe prunes (its family's six linears a layer) keep that share
    of zeros, the smallest weights cut, as a pruned student's."""
    from transformers import AutoModelForSequenceClassification

    from sparsebert.deploy.bench import prune_by_magnitude
    from sparsebert.pipeline.train import student_label_order

    torch.manual_seed(seed)
    labels = student_label_order(task) or ["LABEL_0"]
    sizes = dict(num_labels=len(labels),
                 id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, **sizes))
    if task.is_regression:
        model.config.problem_type = "regression"
    with torch.no_grad():
        head = model.classifier if isinstance(model.classifier, torch.nn.Linear) else model.classifier.out_proj
        head.weight.normal_(0, 3.0)
        head.bias.fill_(2.5 if task.is_regression else 0.0)
    prune_by_magnitude(model, sparsity)
    model.save_pretrained(folder)
    save_tokenizer(model_type, folder)
    return folder
