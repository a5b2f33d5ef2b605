"""GPT models (GPT-2 and LLaMA families), KV cache and decoding."""
