"""SparseBERT: knowledge-aware sparse pruning of fine-tuned BERT, served on CPU.

Telemetry of the Neural Magic stack is switched off by ``sparsebert._startup`` whenever it is
imported; the CLI also keeps the Hugging Face hub offline unless a hub model or data set was
asked for (``sparsebert.offline``).
"""

__version__ = "0.1.0"
