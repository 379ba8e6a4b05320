"""conv_ae and the feature classifier (graftfl/core/autoencoder.py)."""

from __future__ import annotations

import torch

from graftfl.core.autoencoder import (
    class_grid_figure,
    encode,
    feature_classifier,
    load_autoencoder,
    reconstruction_error_by_class,
    save_autoencoder,
    train_autoencoder,
)
from graftfl.core.data import load_dataset
from graftfl.core.models import build_model, cut_model


def test_conv_ae_is_an_encoder_and_a_decoder_stage():
    torch.manual_seed(0)
    model = build_model("conv_ae", (1, 28, 28), 10, latent_dim=784, channels=16)
    assert model.stage_names == ["encoder", "decoder"]
    x = torch.randn(3, 1, 28, 28)
    encoder, decoder = cut_model(model, ["encoder"])
    latents = encoder(x)
    assert latents.shape == (3, 784)
    assert torch.allclose(decoder(latents), model(x))
    conv = model.encoder[0]
    assert conv.kernel_size == (5, 5) and isinstance(model.encoder[2], torch.nn.MaxPool2d)


def test_training_lowers_the_reconstruction_error_of_every_class(tmp_path):
    data = load_dataset("digits")
    x, y = data.train_x[:600], data.train_y[:600]
    model = build_model("conv_ae", x.shape[1:], 0, latent_dim=32)
    before, counts = reconstruction_error_by_class(model, x, y, 10)
    result = train_autoencoder(model, x, epochs=15, batch_size=64, lr=1e-3, seed=0)
    after, _ = reconstruction_error_by_class(model, x, y, 10)
    assert result["steps"] == 15 * 10
    assert sum(counts) == 600
    assert all(a < 0.6 * b for a, b in zip(after, before, strict=True)), (before, after)

    path = save_autoencoder(tmp_path / "site" / "autoencoder.pt", model, x.shape[1:], 16, ([0.5], [0.25]))
    loaded, stored = load_autoencoder(path)
    assert stored["normalisation"] == ([0.5], [0.25]) and stored["latent_dim"] == 32
    assert torch.equal(encode(loaded, x[:5]), encode(model, x[:5]))
    figure = class_grid_figure(tmp_path / "grid.png", model, x, y, 10)
    assert figure.stat().st_size > 1000


def test_feature_classifier_is_the_papers_mlp():
    model = feature_classifier(784, 10)
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 256), (256, 128), (128, 64), (64, 10)]


def test_a_seeded_classifier_does_not_depend_on_the_order_of_its_rows():
    # a feature store's rows come in the order of the client ids the server gives, which follow the node ids
    # Flower draws at random per run: the same seed must give the same classifier whatever that order
    from graftfl.core.autoencoder import content_order, train_classifier

    generator = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(120, 8, generator=generator), torch.randint(0, 3, (120,), generator=generator)
    shuffled = torch.randperm(120, generator=generator)
    first, _ = train_classifier(latents, labels, 3, epochs=2, batch_size=16, seed=4)
    second, _ = train_classifier(latents[shuffled], labels[shuffled], 3, epochs=2, batch_size=16, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    ordered_latents, ordered_labels = content_order(latents[shuffled], labels[shuffled])
    assert torch.equal(ordered_labels, labels.sort(stable=True).values)  # grouped by label, the same rows
    assert sorted(map(tuple, ordered_latents.tolist())) == sorted(map(tuple, latents.tolist()))
