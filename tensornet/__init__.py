"""tensornet: tensor-network (MPO / tensor-train) decomposition and tensor adapters for LLMs.

The core (this package) is array-library agnostic: numpy arrays and torch tensors go in,
the same type, device and dtype come out. Torch modules and transformers integration live
in :mod:`tensornet.adapters`.
"""

from .decompose import mpo_decompose, tt_decompose
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    DTypeError,
    NonFiniteError,
    PeftVersionError,
    RankError,
    ShapeError,
    TensornetError,
)
from .formats import MPO, TensorTrain
from .params import (
    compression_ratio,
    lorta_num_params,
    lotr_num_params,
    mpo_num_params,
    mpo_ranks,
    rank_for_budget,
    tt_num_params,
    tt_ranks,
)
from .plan import ContractionPlan, MachineProfile, calibrate, mpo_matmul, plan_mpo_matmul
from .tensorize import (
    PAPER_SHAPES,
    combine_halves,
    cores_to_matrix,
    factorize,
    matrix_to_tensor,
    mpo_halves,
    mpo_modes,
    tensor_to_matrix,
)

__version__ = "0.1.0"

__all__ = [
    "MPO",
    "PAPER_SHAPES",
    "AdapterFileError",
    "AdapterMismatchError",
    "ConfigError",
    "ContractionPlan",
    "MachineProfile",
    "DTypeError",
    "NonFiniteError",
    "PeftVersionError",
    "RankError",
    "ShapeError",
    "TensorTrain",
    "TensornetError",
    "calibrate",
    "compression_ratio",
    "combine_halves",
    "cores_to_matrix",
    "factorize",
    "lorta_num_params",
    "lotr_num_params",
    "matrix_to_tensor",
    "mpo_decompose",
    "mpo_matmul",
    "mpo_halves",
    "mpo_modes",
    "mpo_num_params",
    "mpo_ranks",
    "plan_mpo_matmul",
    "rank_for_budget",
    "tensor_to_matrix",
    "tt_decompose",
    "tt_num_params",
    "tt_ranks",
]
