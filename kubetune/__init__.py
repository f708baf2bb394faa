"""kubetune: QLoRA/LoRA fine-tuning of open-weight LLMs on Kubernetes."""

__version__ = "0.1.0"
