"""A tiny byte-level BPE tokenizer trained in-process (no download), and tiny_llama folders."""

from __future__ import annotations

from typing import Any


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """A ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens trained on the arithmetic task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tensornet.finetune import arithmetic_splits

    texts = [f"Question: {e.prompt}\nAnswer: {e.response}"
             for e in arithmetic_splits(300, 0, 0, seed=123).train]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny_model(folder: Any, *, seed: int = 0) -> Any:
    """Save ``tiny_llama(seed=seed)`` and :func:`tiny_tokenizer` as a local model folder.

    Returns ``folder``, as given.
    """
    from tensornet.adapters import tiny_llama

    tiny_llama(seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
