"""Fine-tuning with DoTA and its baselines: data, methods, training loop, comparisons.

``tasks`` builds the data (the built-in ``arithmetic`` task or a JSONL file), ``methods``
prepares a model for a method (DoTA, DoTA-Random, QDoTA, and peft's LoRA, PiSSA and
QLoRA, or full fine-tuning), ``training`` runs the paper's recipe with checkpoint/resume,
and ``compare`` runs several methods and seeds on the same data and budget.
"""

import importlib
from typing import Any

# Imported on first use, so that `tensornet --help` does not load torch and transformers.
_WHERE = {
    "run_compare": "compare",
    "DEFAULT_LR": "names",
    "METHODS": "names",
    "BuiltMethod": "methods",
    "MethodOptions": "methods",
    "build_method": "methods",
    "save_trained": "methods",
    "DataError": "tasks",
    "Example": "tasks",
    "Splits": "tasks",
    "arithmetic_splits": "tasks",
    "extract_answer": "tasks",
    "load_jsonl": "tasks",
    "split_examples": "tasks",
    "TrainConfig": "training",
    "TrainResult": "training",
    "evaluate_accuracy": "training",
    "evaluate_loss": "training",
    "train": "training",
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
    "evaluate_accuracy",
    "evaluate_loss",
    "extract_answer",
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
