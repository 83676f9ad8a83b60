"""Tokenization of examples: the prompt's format, token ids and labels, batches.

A prompt is formatted with the tokenizer's chat template when it has one (a system
message asking for GSM8K's answer format, :data:`SYSTEM_PROMPT`), and its tokens are
masked with ``-100`` (:data:`IGNORE_INDEX`) so that the loss is taken on the response
only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DataError
from .examples import Example

__all__ = [
    "SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "format_prompt",
    "encode_example",
    "encode_all",
    "collate",
]

#: The system message used with chat templates: asks for GSM8K's answer format.
SYSTEM_PROMPT = "Solve step by step; end with '#### N'."

#: The label of a token the loss ignores (the prompt's, and padding).
IGNORE_INDEX = -100


def format_prompt(tokenizer: Any, prompt: str) -> str:
    r"""The text the model sees before its response.

    With a chat template: a system message (:data:`SYSTEM_PROMPT`), the user's prompt
    and the assistant header. Without one: ``"Question: ...\nAnswer: "``.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return f"Question: {prompt}\nAnswer: "


def encode_example(tokenizer: Any, example: Example, *, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one example; the prompt's labels are ``-100``.

    The response is followed by the EOS token (so the model learns to stop). A sequence
    longer than ``max_length`` is truncated from the right (the prompt is kept whole
    when it fits).
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt), add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    ids = (list(prompt_ids) + list(response_ids))[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(
    items: Sequence[dict[str, list[int]]], *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(it["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_all(
    tokenizer: Any, examples: Sequence[Example], max_length: int, *, split: str
) -> list[dict[str, list[int]]]:
    """Encode ``examples``, dropping those that keep no response token at ``max_length``.

    An example whose prompt fills ``max_length`` has no token to learn from (every label is
    ``-100``); it is left out. A split none of whose examples keeps a response token
    would train on nothing (and read a validation loss of 0.0): that is refused.

    Raises
    ------
    DataError
        If no example of a non-empty split keeps a response token.
    """
    encoded = [encode_example(tokenizer, ex, max_length=max_length) for ex in examples]
    kept = [e for e in encoded if any(t != IGNORE_INDEX for t in e["labels"])]
    if encoded and not kept:
        shortest = min(sum(t == IGNORE_INDEX for t in e["labels"]) for e in encoded)
        raise DataError(
            f"`max_length` = {max_length} leaves no response token in any of the "
            f"{len(encoded)} {split} examples (the shortest prompt takes {shortest} "
            f"tokens); give a max length above {shortest}"
        )
    return kept
