"""Fine-tuning with DoTA and its baselines: data, methods, the Trainer run, comparisons.

``defaults`` holds the methods, their options, ranks, targets and learning rates;
``tasks`` gathers the data: ``examples`` (the data model and the split), the built-in
``arithmetic`` task, a user's ``datafiles`` and ``tokens`` (tokenization and batches);
``methods`` prepares a model for a method (DoTA, DoTA-Random, QDoTA, LoTR, LoRTA, and
peft's LoRA, DoRA, PiSSA, QPiSSA and QLoRA, or full fine-tuning); ``trainer`` runs the
paper's recipe on ``transformers.Trainer`` (checkpoints, resume, DDP), with the
``callbacks`` that keep the best model and measure the run, on the processes and GPU of
``devices``; ``evaluate`` the test accuracy; ``compare`` several methods and seeds on
the same data and budget; ``checks`` what a run checks before it writes anything (the
model folder, its tokenizer, a checkpoint to resume from).
"""

import importlib
from typing import Any

# Imported on first use, so that `tensornet --help` does not load torch and transformers.
_WHERE = {
    "run_compare": "compare",
    "DEFAULT_LR": "defaults",
    "METHODS": "defaults",
    "BuiltMethod": "methods",
    "MethodOptions": "methods",
    "build_method": "methods",
    "check_method": "methods",
    "save_trained": "methods",
    "DataError": "examples",
    "Example": "examples",
    "Splits": "examples",
    "arithmetic_splits": "arithmetic",
    "extract_answer": "examples",
    "load_jsonl": "datafiles",
    "load_data_file": "datafiles",
    "split_examples": "examples",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "evaluate_accuracy": "evaluate",
    "train": "trainer",
}

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "BuiltMethod",
    "DataError",
    "Example",
    "MethodOptions",
    "Splits",
    "TrainConfig",
    "TrainResult",
    "arithmetic_splits",
    "build_method",
    "check_method",
    "evaluate_accuracy",
    "extract_answer",
    "load_data_file",
    "load_jsonl",
    "run_compare",
    "save_trained",
    "split_examples",
    "train",
]


def __getattr__(name: str) -> Any:
    """Load the public names lazily from their modules."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
