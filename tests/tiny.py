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
