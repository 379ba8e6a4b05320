import pytest
import torch

from graftfl.core.codec import assign_flat_parameters, flatten_parameters, tensor_from_bytes, tensor_to_bytes


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
