"""fedlora: federated fine-tuning of language models with low-rank adapters, private by design."""
__version__ = "0.1.0"
