"""tensornet: tensor-network (MPO / tensor-train) decomposition and tensor adapters for LLMs.

The core (this package) is array-library agnostic: numpy arrays and torch tensors go in,
the same type, device and dtype come out. Its public names are what an analysis needs:
decompose a matrix or a tensor, read the result, count parameters, plan and run an MPO
applied to a batch, tensorize shapes, and the errors it raises. Torch modules, peft
methods and the adapters' own formulas live in :mod:`tensornet.adapters`; every
exception class is in :mod:`tensornet.errors`.
"""

from .calibration import calibrate
from .decompose import mpo_decompose, tt_decompose
from .errors import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    RankError,
    ShapeError,
    TensornetError,
    ToleranceError,
)
from .formats import MPO, TensorTrain
from .matmul import mpo_matmul
from .params import (
    compression_ratio,
    mpo_num_params,
    mpo_ranks,
    rank_for_budget,
    tt_num_params,
    tt_ranks,
)
from .plan import ContractionPlan, plan_mpo_matmul
from .profiles import MachineProfile, profile_for
from .tensorize import cores_to_matrix, factorize, matrix_to_tensor, mpo_modes, tensor_to_matrix

__version__ = "0.1.0"

__all__ = [
    # decomposition and its results
    "mpo_decompose",
    "tt_decompose",
    "MPO",
    "TensorTrain",
    # counting on shapes
    "mpo_ranks",
    "mpo_num_params",
    "tt_ranks",
    "tt_num_params",
    "compression_ratio",
    "rank_for_budget",
    # applying an MPO to a batch
    "plan_mpo_matmul",
    "mpo_matmul",
    "ContractionPlan",
    "MachineProfile",
    "calibrate",
    "profile_for",
    # tensorization
    "factorize",
    "mpo_modes",
    "matrix_to_tensor",
    "tensor_to_matrix",
    "cores_to_matrix",
    # errors (the core's; tensornet.errors defines every one)
    "TensornetError", "ShapeError", "ConfigError", "RankError",
    "ToleranceError", "DTypeError", "NonFiniteError",
]
