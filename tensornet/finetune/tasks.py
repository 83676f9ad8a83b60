"""Fine-tuning data: the built-in ``arithmetic`` task, data files, tokenization, batches.

An :class:`Example` is a ``prompt`` and a ``response``. The built-in task generates
GSM8K-style word problems of 2 to 4 reasoning steps whose response ends with the final
answer in GSM8K's format, ``#### 42``. A user's own data is a JSONL file with one
``{"prompt": ..., "response": ...}`` object per line (:func:`load_jsonl`), or any JSON,
JSON Lines, CSV or Parquet file that Hugging Face ``datasets`` reads, with named prompt
and response columns (:func:`load_data_file`). Both are split into train,
validation and test sets deterministically and without overlap (examples are
de-duplicated by prompt text before they are split).

Tokenization formats a prompt with the tokenizer's chat template when it has one, and
masks the prompt tokens with ``-100`` so that the loss is taken on the response only.

Each job has its module; this one gathers their names in one place:
:mod:`.examples` (the data model and the split), :mod:`.arithmetic` (the built-in task),
:mod:`.datafiles` (reading a user's file) and :mod:`.tokens` (tokenization and batches).
"""

from __future__ import annotations

from .arithmetic import arithmetic_problem, arithmetic_splits
from .datafiles import DATA_SUFFIXES, load_data_file, load_jsonl
from .examples import DataError, Example, Splits, extract_answer, split_examples
from .tokens import IGNORE_INDEX, SYSTEM_PROMPT, collate, encode_all, encode_example, format_prompt

__all__ = [
    "DataError",
    "Example",
    "Splits",
    "SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "arithmetic_problem",
    "arithmetic_splits",
    "DATA_SUFFIXES",
    "load_jsonl",
    "load_data_file",
    "split_examples",
    "extract_answer",
    "format_prompt",
    "encode_example",
    "encode_all",
    "collate",
]
