"""A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a model folder: trains in milliseconds
per step (the trainer's distributed tests, the multi-node end-to-end test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_llama(folder: Path, tokenizer: Any, *, tied: bool = True) -> Path:
    """Save one in `folder` (seed 0, bf16; `tied`: one embedding table for input and lm_head) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
