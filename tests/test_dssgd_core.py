"""DSSGD tensor logic (graftfl.core.selective): selection, clipping, sparse wire format, validation.

The private mechanism (selection=sparse_vector) is tested in tests/test_dssgd_privacy.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from graftfl.core.selective import (
    ParameterStatistics,
    apply_upload,
    choose_download,
    coordinate_budget,
    decode_sparse,
    encode_sparse,
    index_dtype,
    make_upload,
    overwrite,
    select_largest,
    select_threshold,
    sparse_nbytes,
    validate_upload,
)


def test_largest_selection_picks_the_top_abs_coordinates():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    chosen = select_largest(delta, 37)
    assert len(chosen) == 37 and len(torch.unique(chosen)) == 37
    expected = torch.argsort(delta.abs(), descending=True)[:37]
    assert set(chosen.tolist()) == set(expected.tolist())
    rest = torch.ones(1000, dtype=torch.bool)
    rest[chosen] = False
    assert delta[chosen].abs().min() >= delta[rest].abs().max()


def test_largest_selection_prefers_large_negative_updates():
    delta = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05])
    assert select_largest(delta, 2).tolist() == [1, 3]


def test_threshold_selection_only_above_tau_and_at_most_the_budget():
    delta = torch.linspace(-1, 1, 2001)
    tau = 0.5
    above = int((delta.abs() > tau).sum())
    budget = coordinate_budget(0.1, delta.numel())  # 200 < 1000 candidates
    first = select_threshold(delta, tau, budget, torch.Generator().manual_seed(1))
    second = select_threshold(delta, tau, budget, torch.Generator().manual_seed(2))
    assert len(first) == budget < above
    assert bool((delta[first].abs() > tau).all())
    assert len(torch.unique(first)) == budget
    assert set(first.tolist()) != set(second.tolist())  # a random subset, not always the same one
    few = select_threshold(delta, 0.99, budget)  # fewer candidates than the budget: all of them
    assert set(few.tolist()) == set(torch.nonzero(delta.abs() > 0.99).reshape(-1).tolist())


def test_upload_respects_theta_upload_budget():
    delta = torch.randn(12345, generator=torch.Generator().manual_seed(3))
    for theta in (0.1, 0.01, 0.001):
        upload = make_upload(delta, theta_upload=theta, selection="largest")
        assert len(upload.indices) == int(np.floor(theta * delta.numel()))
    threshold = make_upload(delta, theta_upload=0.01, selection="threshold", threshold=0.0, generator=torch.Generator().manual_seed(0))
    assert len(threshold.indices) == coordinate_budget(0.01, delta.numel())


def test_clipping_bounds_uploaded_values_and_keeps_small_ones():
    delta = torch.tensor([0.5, -2.0, 0.01, 3.0, -0.02, 0.0])
    upload = make_upload(delta, theta_upload=1.0, clip=0.1)
    values = dict(zip(upload.indices.tolist(), upload.values.tolist(), strict=True))
    assert values[0] == pytest.approx(0.1) and values[1] == pytest.approx(-0.1) and values[3] == pytest.approx(0.1)
    assert values[2] == pytest.approx(0.01) and values[4] == pytest.approx(-0.02)
    assert bool((upload.values.abs() <= 0.1 + 1e-7).all())


def test_epsilon_without_private_selection_is_refused():
    """ε on the values alone bounds nothing while the coordinates are chosen in the clear."""
    for selection, threshold in (("largest", None), ("threshold", 0.0)):
        with pytest.raises(ValueError, match="sparse_vector"):
            make_upload(torch.ones(10), theta_upload=0.5, selection=selection, threshold=threshold, clip=0.1, upload_epsilon=1.0)


def _through_array_record(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    record = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})
    return {name: array.numpy() for name, array in record.items()}, sum(a.numpy().nbytes for a in record.values())


def test_sparse_encoding_round_trip_and_byte_size():
    delta = torch.randn(61_706, generator=torch.Generator().manual_seed(4))
    upload = make_upload(delta, theta_upload=0.01, clip=0.5)
    arrays = encode_sparse(upload.indices, upload.values, delta.numel())
    assert arrays["indices"].dtype == np.int32 and arrays["values"].dtype == np.float32
    received, nbytes = _through_array_record(arrays)
    indices, values = decode_sparse(received)
    assert torch.equal(indices, upload.indices) and torch.equal(values, upload.values)
    count = coordinate_budget(0.01, delta.numel())
    assert nbytes == sparse_nbytes(count, delta.numel()) == count * 8
    assert nbytes <= 0.03 * delta.numel() * 4  # ≤ 3 % of a dense float32 upload
    assert index_dtype(2**31 + 5) == np.int64 and sparse_nbytes(10, 2**31 + 5) == 10 * 12


def test_dense_download_carries_no_indices():
    params = torch.randn(500)
    arrays = encode_sparse(None, params, params.numel())
    assert set(arrays) == {"values"}
    indices, values = decode_sparse(_through_array_record(arrays)[0])
    assert indices is None and torch.equal(overwrite(torch.zeros(500), indices, values), params)


@pytest.mark.parametrize(
    "indices, values, reason",
    [
        (torch.tensor([0, 5, 100]), torch.tensor([1.0, 2.0, 3.0]), "out of range"),
        (torch.tensor([-1, 5]), torch.tensor([1.0, 2.0]), "out of range"),
        (torch.tensor([3, 3, 4]), torch.tensor([1.0, 2.0, 3.0]), "duplicate"),
        (torch.tensor([1, 2]), torch.tensor([float("nan"), 1.0]), "non-finite"),
        (torch.tensor([1, 2]), torch.tensor([float("inf"), 1.0]), "non-finite"),
        (torch.arange(11), torch.ones(11), "exceed"),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), "integers"),
        (torch.tensor([1, 2]), torch.tensor([1.0, 2.0], dtype=torch.float64), "float32"),
        (torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]), "equal length"),
        (None, torch.tensor([1.0]), "no indices"),
    ],
)
def test_validate_upload_rejects_bad_uploads(indices, values, reason):
    assert reason in validate_upload(indices, values, num_params=100, max_count=10)


def test_validate_upload_accepts_a_good_one():
    assert validate_upload(torch.tensor([0, 50, 99]), torch.tensor([0.1, -0.2, 0.3]), num_params=100, max_count=3) is None


def test_validate_upload_enforces_the_declared_range():
    """With γ declared, a value beyond ±γ (1e30, or just above γ) is refused; exactly ±γ as float32 passes."""
    gamma = 0.05
    clipped = make_upload(torch.tensor([1.0, -1.0, 0.01]), theta_upload=1.0, clip=gamma)
    assert validate_upload(clipped.indices, clipped.values, num_params=3, max_count=3, bound=gamma) is None
    for bad in (1e30, -1e30, float(np.nextafter(np.float32(gamma), np.float32(1)))):
        reason = validate_upload(torch.tensor([0, 1]), torch.tensor([0.01, bad]), num_params=3, max_count=3, bound=gamma)
        assert "outside the declared range" in reason
    assert validate_upload(torch.tensor([0]), torch.tensor([1e30]), num_params=3, max_count=3) is None  # no γ: no range to enforce


def test_apply_upload_and_statistics():
    params = torch.zeros(10)
    stats = ParameterStatistics(10)
    apply_upload(params, torch.tensor([1, 3]), torch.tensor([0.5, -1.0]))
    stats.record(torch.tensor([1, 3]), server_round=1)
    apply_upload(params, torch.tensor([3]), torch.tensor([2.0]))
    stats.record(torch.tensor([3]), server_round=2)
    assert params.tolist() == [0, 0.5, 0, 1.0, 0, 0, 0, 0, 0, 0]
    assert stats.update_count.tolist() == [0, 1, 0, 2, 0, 0, 0, 0, 0, 0]
    assert stats.last_updated.tolist() == [0, 1, 0, 2, 0, 0, 0, 0, 0, 0]


def test_download_choices():
    params = torch.tensor([0.0, -9.0, 1.0, 8.0, 0.5, 0.1, -0.2, 7.0, 0.0, 0.3])
    stats = ParameterStatistics(10)
    stats.record(torch.tensor([2, 4, 5]), 1)
    stats.record(torch.tensor([4, 5]), 2)
    stats.record(torch.tensor([2]), 3)
    assert choose_download("largest", 0.3, params, stats).tolist() == [1, 3, 7]
    # counts: 2->2, 4->2, 5->2; recency breaks the tie: 2 (round 3) first, then 4 and 5 (round 2)
    assert choose_download("most_updated", 0.1, params, stats).tolist() == [2]
    assert set(choose_download("most_updated", 0.3, params, stats).tolist()) == {2, 4, 5}
    random = choose_download("random", 0.5, params, stats, torch.Generator().manual_seed(0))
    assert len(random) == 5 and len(torch.unique(random)) == 5
    assert choose_download("random", 1.0, params, stats) is None
