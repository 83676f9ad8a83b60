"""Test accuracy: greedy generation and exact match of the final number.

The Trainer computes the validation loss; the accuracy of generated answers is the task's
own metric (GSM8K's: the final number of the response), computed after training on the
main process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .examples import Example, extract_answer
from .tokens import format_prompt

__all__ = ["evaluate_accuracy"]


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> tuple[float, list[dict[str, Any]]]:
    """Exact-match accuracy of the final number under greedy decoding.

    Returns
    -------
    accuracy : float
        Share of the ``examples`` that have an expected number (``example.answer``, or
        the number of the reference response) whose generated final number
        (:func:`extract_answer`) equals it; NaN when none has one (free-text answers,
        reported as "n/a").
    predictions : list of dict
        ``prompt``, ``generated``, ``predicted`` and ``expected`` per example.
    """
    if not examples:
        return math.nan, []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    preds: list[dict[str, Any]] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer(
                [format_prompt(tokenizer, ex.prompt) for ex in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
            width = enc["input_ids"].shape[1]
            for ex, seq in zip(chunk, out):
                text = tokenizer.decode(seq[width:], skip_special_tokens=True)
                expected = ex.answer if ex.answer is not None else extract_answer(ex.response)
                preds.append(
                    {
                        "prompt": ex.prompt,
                        "generated": text,
                        "predicted": extract_answer(text),
                        "expected": expected,
                    }
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    # only answers that are numbers are scored (free-text data has none: NaN, "n/a")
    scored = [p for p in preds if p["expected"] is not None]
    if not scored:
        return math.nan, preds
    correct = sum(p["predicted"] is not None and p["predicted"] == p["expected"] for p in scored)
    return correct / len(scored), preds
