import io

import numpy as np
import pytest
import torch

from graftfl.core.codec import assign_flat_parameters, flatten_parameters, npy_array, tensor_from_bytes, tensor_to_bytes


@pytest.mark.parametrize("dtype,bytes_per_value,tolerance", [("float32", 4, 0.0), ("float16", 2, 1e-3), ("bfloat16", 2, 1e-2)])
def test_tensor_round_trip_in_each_wire_dtype(dtype, bytes_per_value, tolerance):
    tensor = torch.randn(3, 5, 7)
    payload = tensor_to_bytes(tensor, dtype)
    assert len(payload) == tensor.numel() * bytes_per_value
    back = tensor_from_bytes(payload, tensor.shape, dtype)
    assert back.dtype == torch.float32 and back.shape == tensor.shape
    assert torch.allclose(back, tensor, rtol=tolerance, atol=tolerance)


def test_size_mismatch_and_unknown_dtype_are_rejected():
    payload = tensor_to_bytes(torch.zeros(4), "float32")
    with pytest.raises(ValueError, match="needs 20"):
        tensor_from_bytes(payload, (5,), "float32")
    with pytest.raises(ValueError, match="valid"):
        tensor_from_bytes(payload, (4,), "float8")


def test_flat_parameters_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    flat = flatten_parameters(model)
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    assign_flat_parameters(model, torch.zeros_like(flat))
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    with pytest.raises(ValueError):
        assign_flat_parameters(model, torch.zeros(3))


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=allow_pickle)
    return stream.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
    np.array([1, 2], dtype=">i4"),
    np.zeros((0, 5), dtype=np.float16),
    np.float64(3.5),
    np.array([True, False]),
    np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]),
], ids=["float32", "fortran", "big-endian", "empty", "scalar", "bool", "structured"])
def test_npy_array_reads_what_numpy_reads(array):
    data = _npy(array)
    expected, got = np.load(io.BytesIO(data), allow_pickle=False), npy_array(data)
    assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
    assert got.flags.f_contiguous == expected.flags.f_contiguous
    again = npy_array(data)  # from the parsed-header cache
    assert again.dtype == expected.dtype and again.shape == expected.shape and np.array_equal(again, expected)


def test_npy_array_refuses_pickles_and_short_payloads():
    with pytest.raises(ValueError, match="Python objects"):
        npy_array(_npy(np.array([1, "x"], dtype=object), allow_pickle=True))
    with pytest.raises(ValueError, match="needs 80"):
        npy_array(_npy(np.arange(10, dtype=np.int64))[:-8])
    with pytest.raises(ValueError):
        npy_array(b"not an npy payload")


def test_a_site_decodes_a_record_as_flower_does():
    from flwr.app import ArrayRecord

    from graftfl.clients.utils import state_from
    from graftfl.strategies.wire_bytes import array_values

    state = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "empty": torch.zeros(0)}
    record = ArrayRecord(state)
    decoded, flowers = state_from(record), record.to_torch_state_dict()
    assert list(decoded) == list(flowers)
    for key, tensor in flowers.items():
        assert decoded[key].dtype == tensor.dtype and torch.equal(decoded[key], tensor)
        assert np.array_equal(array_values(record[key]), record[key].numpy())
    decoded["w"].add_(1)  # writable copies: the record's bytes are untouched
    assert torch.equal(record.to_torch_state_dict()["w"], state["w"])
