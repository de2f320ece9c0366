"""llmsys: pre-training, fine-tuning and alignment of large language models on DeepSpeed ZeRO."""

__version__ = "0.1.0"
