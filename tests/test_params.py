"""Tests for tensornet.params: MPO ranks (eq. (1)), parameter counts, budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensornet as tn
from tensornet import (
    ConfigError,
    RankError,
    ShapeError,
    mpo_num_params,
    mpo_ranks,
    rank_for_budget,
)
from tensornet.params import check_rank

FAST = settings(max_examples=50, deadline=None, derandomize=True, database=None)


def eq1_ranks(out_modes, in_modes, cap=None):
    """Reference: R_k = min(prod_{n<=k} I_n J_n, prod_{n>k} I_n J_n), capped, R_0 = R_N = 1."""
    d = [i * j for i, j in zip(out_modes, in_modes)]
    n = len(d)
    ranks = [1]
    for k in range(1, n):
        full = min(math.prod(d[:k]), math.prod(d[k:]))
        ranks.append(full if cap is None else min(full, cap))
    return (*ranks, 1)


def count(out_modes, in_modes, ranks):
    """Reference: rho = sum_k R_{k-1} I_k J_k R_k."""
    return sum(ranks[k] * out_modes[k] * in_modes[k] * ranks[k + 1] for k in range(len(out_modes)))


@st.composite
def modes_and_rank(draw, max_mode=8):
    n = draw(st.integers(1, 7))
    out_modes = draw(st.lists(st.integers(1, max_mode), min_size=n, max_size=n))
    in_modes = draw(st.lists(st.integers(1, max_mode), min_size=n, max_size=n))
    rank = draw(st.integers(1, 300))
    return tuple(out_modes), tuple(in_modes), rank


def test_paper_example_3328():
    # DoTA section 2.2: 1024 x 1024, N = 5, R = 8, all modes 4 -> "about 3.3K" parameters.
    assert mpo_num_params((4,) * 5, (4,) * 5, 8) == 3328
    assert mpo_ranks((4,) * 5, (4,) * 5, 8) == (1, 8, 8, 8, 8, 1)


def test_paper_shapes_full_ranks():
    # 4096 x 4096 with Table 2's modes: eq. (1) gives 16, 256, 1024 (= 4096 / 4), 16.
    modes = (4, 4, 8, 8, 4)
    assert mpo_ranks(modes, modes) == (1, 16, 256, 1024, 16, 1)
    assert mpo_ranks(modes, modes, 16) == (1, 16, 16, 16, 16, 1)


@FAST
@given(modes_and_rank())
def test_mpo_ranks_follow_eq1_capped(case):
    out_modes, in_modes, rank = case
    assert mpo_ranks(out_modes, in_modes) == eq1_ranks(out_modes, in_modes)
    assert mpo_ranks(out_modes, in_modes, None) == eq1_ranks(out_modes, in_modes)
    assert mpo_ranks(out_modes, in_modes, rank) == eq1_ranks(out_modes, in_modes, rank)
    # a list of identical caps is the same as the int
    n = len(out_modes)
    assert mpo_ranks(out_modes, in_modes, [rank] * (n - 1)) == mpo_ranks(out_modes, in_modes, rank)


@FAST
@given(modes_and_rank())
def test_mpo_num_params_is_sum_of_core_sizes(case):
    out_modes, in_modes, rank = case
    for cap in (None, rank):
        ranks = eq1_ranks(out_modes, in_modes, cap)
        assert mpo_num_params(out_modes, in_modes, cap) == count(out_modes, in_modes, ranks)


@FAST
@given(modes_and_rank())
def test_closed_form_with_every_bond_at_r(case):
    out_modes, in_modes, _ = case
    n = len(out_modes)
    full = eq1_ranks(out_modes, in_modes)
    # every R up to the smallest eq. (1) bond puts every bond at exactly R
    for R in range(1, min(full[1:-1], default=1) + 1):
        d = [i * j for i, j in zip(out_modes, in_modes)]
        if n == 1:
            expected = d[0]
        else:
            expected = R * (d[0] + d[-1]) + R * R * sum(d[1:-1])
        assert mpo_num_params(out_modes, in_modes, R) == expected


def test_tt_ranks_and_count():
    assert tn.tt_ranks((4, 5, 6)) == (1, 4, 6, 1)
    assert tn.tt_ranks((4, 5, 6), 2) == (1, 2, 2, 1)
    assert tn.tt_num_params((4, 5, 6), 2) == 4 * 2 + 2 * 5 * 2 + 2 * 6
    # the MPO count is the TT count of the paired modes I_k J_k
    assert mpo_num_params((2, 3, 4), (5, 1, 2), 3) == tn.tt_num_params((10, 3, 8), 3)


@FAST
@given(modes_and_rank())
def test_compression_ratio_is_dense_over_count(case):
    out_modes, in_modes, rank = case
    dense = math.prod(out_modes) * math.prod(in_modes)
    ratio = tn.compression_ratio(out_modes, in_modes, rank)
    assert ratio == pytest.approx(dense / mpo_num_params(out_modes, in_modes, rank), rel=1e-15)
    # a single core (N = 1) is the dense matrix itself
    assert tn.compression_ratio(out_modes[:1], in_modes[:1]) == pytest.approx(1.0)


def test_paper_compression_ratio():
    assert tn.compression_ratio((4,) * 5, (4,) * 5, 8) == pytest.approx(1024 * 1024 / 3328)


@FAST
@given(modes_and_rank(max_mode=6), st.integers(1, 10**6))
def test_rank_for_budget_is_largest_fitting_rank(case, budget):
    out_modes, in_modes, _ = case
    at_one = mpo_num_params(out_modes, in_modes, 1)
    if at_one > budget:
        with pytest.raises(RankError) as info:
            rank_for_budget(out_modes, in_modes, budget)
        assert "`budget`" in str(info.value) and str(budget) in str(info.value)
        return
    R = rank_for_budget(out_modes, in_modes, budget)
    assert isinstance(R, int) and R >= 1
    assert mpo_num_params(out_modes, in_modes, R) <= budget
    nxt = mpo_num_params(out_modes, in_modes, R + 1)
    # R + 1 busts the budget, unless every bond is already at its eq. (1) rank (R + 1
    # then changes nothing and R is the full-rank cap)
    if nxt <= budget:
        assert R >= max(eq1_ranks(out_modes, in_modes))
        assert nxt == mpo_num_params(out_modes, in_modes, R)
    else:
        assert nxt > budget


def test_rank_for_budget_paper_numbers():
    assert rank_for_budget((4,) * 5, (4,) * 5, 3328) == 8
    assert rank_for_budget((4,) * 5, (4,) * 5, 3327) == 7


def test_rank_for_budget_too_small_raises_rank_error():
    at_one = mpo_num_params((4,) * 5, (4,) * 5, 1)  # 16 * 5 = 80
    assert at_one == 80
    with pytest.raises(RankError) as info:
        rank_for_budget((4,) * 5, (4,) * 5, 79)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "`budget`" in msg and "79" in msg and "80" in msg
    assert rank_for_budget((4,) * 5, (4,) * 5, 80) == 1


@pytest.mark.parametrize(
    ("call", "exc", "fragments"),
    [
        (lambda: mpo_ranks((2, 2), (2, 2, 2)), ShapeError, ["`out_modes`", "[2, 2, 2]"]),
        (lambda: mpo_ranks((2, 0), (2, 2)), ShapeError, ["`out_modes`", "[2, 0]"]),
        (lambda: mpo_ranks((), (2,)), ShapeError, ["`out_modes`", "()"]),
        (lambda: mpo_ranks((2, 2), (2, 2), 0), RankError, ["`rank`", "got 0"]),
        (lambda: mpo_ranks((2, 2, 2), (2, 2, 2), [3]), RankError, ["`rank`", "[3]"]),
        (lambda: mpo_num_params((2, 2), (2, 2), -1), RankError, ["`rank`", "-1"]),
        (lambda: rank_for_budget((2, 2), (2, 2), 0), ShapeError, ["`budget`", "0"]),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, tn.TensornetError)
    for fragment in fragments:
        assert fragment in str(info.value)


# ------------------------------------------------------------ one rank specification


@FAST
@given(modes_and_rank())
def test_the_four_rank_forms_agree(case):
    out_modes, in_modes, rank = case
    n = len(out_modes)
    exact = mpo_ranks(out_modes, in_modes)
    capped = mpo_ranks(out_modes, in_modes, rank)
    assert mpo_ranks(out_modes, in_modes, None) == exact
    assert mpo_ranks(out_modes, in_modes, [rank] * (n - 1)) == capped
    assert mpo_ranks(out_modes, in_modes, [1, *[rank] * (n - 1), 1]) == capped
    # ranks round-trip: the returned N+1 values are a valid request for the same ranks
    assert mpo_ranks(out_modes, in_modes, capped) == capped
    assert mpo_ranks(out_modes, in_modes, exact) == exact
    assert mpo_num_params(out_modes, in_modes, capped) == mpo_num_params(out_modes, in_modes, rank)


def test_check_rank_forms_and_errors():
    assert check_rank(None, 4) is None
    assert check_rank(7, 4) == (7, 7, 7)
    assert check_rank([3, 4, 5], 4) == check_rank((1, 3, 4, 5, 1), 4) == (3, 4, 5)
    assert check_rank(np.array([1, 3, 4, 5, 1]), 4) == (3, 4, 5)
    assert check_rank([], 1) == check_rank([1, 1], 1) == ()
    for bad in (0, -2, 2.0, True, "16", [3, 4], [2, 3, 4, 5, 1], [1, 3, 0, 5, 1], [3, None, 5]):
        with pytest.raises(RankError) as info:
            check_rank(bad, 4)
        msg = str(info.value)
        assert "`rank`" in msg and "3 positive ints" in msg and "5 positive ints" in msg
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_dota_config_takes_the_same_rank_specification():
    from tensornet.adapters import DoTAConfig

    full = DoTAConfig(num_cores=3, rank=[1, 8, 4, 1])
    inner = DoTAConfig(num_cores=3, rank=[8, 4])
    exact = DoTAConfig(num_cores=3, rank=None)
    modes = ((4, 4, 4), (4, 4, 4))
    assert full.layer_modes(64, 64)[2] == inner.layer_modes(64, 64)[2] == mpo_ranks(*modes, [8, 4])
    assert exact.layer_modes(64, 64)[2] == mpo_ranks(*modes)  # exact ranks, no 1 << 30
    for bad in (0, [8], [2, 8, 4, 1], "16"):
        with pytest.raises(RankError) as info:  # the core's error, also a ConfigError
            DoTAConfig(num_cores=3, rank=bad)
        assert "`rank`" in str(info.value) and "2 positive ints" in str(info.value)


def test_lotr_lorta_ranks_raise_rank_error():
    from tensornet.adapters import LoRTAConfig, LoTRConfig, lorta_num_params, lotr_num_params

    for call in (
        lambda: LoTRConfig(rank=0),
        lambda: LoRTAConfig(rank=2.5),
        lambda: lotr_num_params({"q": (4, 4)}, 2, 0),
        lambda: lorta_num_params(8, 2, 4, 4, 2, -1),
    ):
        with pytest.raises(RankError, match="`rank` must be a positive int"):
            call()


def test_decompose_model_exact_ranks_without_a_sentinel():
    from tensornet.adapters import tiny_llama
    from tensornet.finetune.analysis import decompose_model

    report = decompose_model(tiny_llama(), num_cores=3, rank=None, sweep_ranks=(2,))
    assert report.layers
    for lay in report.layers:
        assert lay.ranks == mpo_ranks(lay.out_modes, lay.in_modes)
        assert lay.relative_error < 1e-5


def test_rank_for_budget_caps_at_the_exact_rank():
    # documented: beyond the largest exact rank a larger cap changes nothing
    full = mpo_ranks((2, 2), (2, 2))
    assert rank_for_budget((2, 2), (2, 2), 10**9) == max(full) == 4
    assert mpo_num_params((2, 2), (2, 2), 4) == mpo_num_params((2, 2), (2, 2))
