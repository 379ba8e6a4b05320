import pytest
import torch

from graftfl.core.models import MODELS, build_model, cut_model

SHAPES = {"lenet": (1, 28, 28), "cnn": (3, 32, 32), "mlp": (1, 8, 8), "small_cnn": (1, 8, 8), "vgg11": (3, 32, 32), "resnet18": (3, 32, 32)}


# conv_ae reconstructs images instead of predicting classes: tests/test_features_models.py covers it.
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"conv_ae"}))
def test_cut_parts_in_sequence_equal_the_whole_model(name):
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name, shape, 10).eval()  # eval: batch-norm statistics stay fixed between the two passes
    x = torch.randn(4, *shape)
    y = torch.tensor([0, 1, 2, 3])
    names = model.stage_names
    parts = cut_model(model, [names[0], names[-2]]) if len(names) > 2 else cut_model(model, [names[0]])

    whole_loss = torch.nn.functional.cross_entropy(model(x), y)
    whole_grads = torch.autograd.grad(whole_loss, list(model.parameters()))
    out = x
    for part in parts:
        out = part(out)
    cut_loss = torch.nn.functional.cross_entropy(out, y)
    cut_grads = torch.autograd.grad(cut_loss, [p for part in parts for p in part.parameters()])

    assert torch.allclose(whole_loss, cut_loss, atol=1e-6)
    assert len(whole_grads) == len(cut_grads)
    for a, b in zip(whole_grads, cut_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_cut_parts_share_parameters_with_the_model():
    model = build_model("lenet", (1, 28, 28), 10)
    bottom, top = cut_model(model, ["conv1"])
    assert bottom.stage_names == ["conv1"]
    assert top.stage_names[0] == "conv2"
    assert bottom.conv1[0].weight is model.conv1[0].weight


def test_cut_rejects_unknown_and_unordered_stages():
    model = build_model("lenet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="stages of this model"):
        cut_model(model, ["nope"])
    with pytest.raises(ValueError, match="model order"):
        cut_model(model, ["fc1", "conv1"])
    with pytest.raises(ValueError, match="last stage"):
        cut_model(model, ["head"])


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid models: .*lenet"):
        build_model("alexnet", (1, 28, 28), 10)


def test_a_model_too_deep_for_the_input_is_refused_by_name_and_a_fitting_one_keeps_its_modes():
    from graftfl.core.models import check_accepts

    with pytest.raises(ValueError, match=r"model 'vgg11' does not accept inputs of shape \(1, 8, 8\)"):
        check_accepts(build_model("vgg11", (1, 8, 8), 10), (1, 8, 8), "vgg11")
    model = build_model("resnet18", (3, 32, 32), 10)  # batch norm: a one-sample batch only in eval mode
    model.layer1.eval()
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}
    check_accepts(model, (3, 32, 32), "resnet18")
    assert model.training and not model.layer1.training
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in model.named_buffers())


def test_a_run_with_a_model_too_deep_for_its_data_stops_at_the_server(tmp_path):
    from graftfl import cli
    from graftfl.config import resolve_job_config

    overrides = ["protocol=fedavg", "dataset=digits", "model=vgg11", "num_clients=2", "rounds=1", "sim.backend=inprocess",
                 "progress=false", f"output_dir={tmp_path}"]
    with pytest.raises(ValueError, match="model 'vgg11' does not accept inputs of shape"):
        cli.simulate(resolve_job_config(overrides))
