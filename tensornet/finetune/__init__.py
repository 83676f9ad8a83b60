"""Fine-tuning with DoTA and its baselines: data, methods, training loop, comparisons.

``tasks`` builds the data (the built-in ``arithmetic`` task or a JSONL file), ``methods``
prepares a model for a method (DoTA, DoTA-Random, QDoTA, and peft's LoRA, PiSSA and
QLoRA, or full fine-tuning), ``train`` runs the paper's recipe with checkpoint/resume,
and ``compare`` runs several methods and seeds on the same data and budget.
"""

from .compare import run_compare
from .methods import DEFAULT_LR, METHODS, BuiltMethod, MethodOptions, build_method, save_trained
from .tasks import (
    DataError,
    Example,
    Splits,
    arithmetic_splits,
    extract_answer,
    load_jsonl,
    split_examples,
)
from .train import TrainConfig, TrainResult, evaluate_accuracy, evaluate_loss, train

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
