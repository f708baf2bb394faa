"""The kubetune trainer: QLoRA/LoRA supervised fine-tuning of one FineTuneJob.

Importing this package (and `config`) must not import torch: the operator builds trainer configs too.
"""
