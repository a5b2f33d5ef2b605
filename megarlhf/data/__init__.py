"""Data: tokenizers, chat templates, SFT samples, packing and the resumable sampler/loader."""
