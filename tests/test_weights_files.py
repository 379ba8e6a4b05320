"""Files a user is handed (checkpoints, classifiers, autoencoders) load as weights only: a crafted pickle runs nothing."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from graftfl.core.autoencoder import conv_ae, feature_classifier, load_autoencoder, load_classifier, save_autoencoder, save_classifier
from graftfl.core.weights_file import UnsafeWeightsFile
from graftfl.strategies.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint


class _PlantsMarker:
    """What an attacker pickles: unpickling calls ``os.system`` (here: creating a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_crafted(path, marker, wrap):
    """A ``torch.save`` file whose payload would run ``touch marker`` under a full unpickler."""
    torch.save(wrap(_PlantsMarker(marker)), path)
    # sanity: the file really is an exploit (the old loader would have run it)
    probe = marker.with_name(marker.name + ".probe")
    torch.save(wrap(_PlantsMarker(probe)), path.with_suffix(".probe"))
    torch.load(path.with_suffix(".probe"), weights_only=False)
    assert probe.exists(), "the crafted file does not run code under a full unpickler: the test would prove nothing"


def test_checkpoint_resume_refuses_a_crafted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    write_crafted(tmp_path / CHECKPOINT_FILE, marker, lambda payload: {"round": 3, "model": {}, "extra": {"x": payload}})
    with pytest.raises(UnsafeWeightsFile, match="not a plain weights file"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_resume_through_server_run_refuses_a_crafted_checkpoint(tmp_path):
    """What ``resume=runs/<id>`` does: ServerRun loads the run's checkpoint."""
    from omegaconf import OmegaConf

    from graftfl.strategies.utils import ServerRun

    marker = tmp_path / "pwned"
    write_crafted(tmp_path / CHECKPOINT_FILE, marker, lambda payload: payload)
    cfg = OmegaConf.create({"device": "cpu"})
    with pytest.raises(UnsafeWeightsFile):
        ServerRun(cfg, tmp_path, resume=True)
    assert not marker.exists()


def test_classifier_and_autoencoder_files_refuse_a_crafted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    write_crafted(tmp_path / "classifier.pt", marker, lambda payload: {"state": payload, "latent_dim": 4, "num_classes": 2, "hidden": [], "version": 1})
    with pytest.raises(UnsafeWeightsFile):
        load_classifier(tmp_path / "classifier.pt")
    write_crafted(tmp_path / "autoencoder.pt", marker, lambda payload: payload)
    with pytest.raises(UnsafeWeightsFile):
        load_autoencoder(tmp_path / "autoencoder.pt")
    assert not marker.exists()


def test_serve_refuses_a_crafted_classifier(tmp_path, capsys):
    """``graftfl serve --run <dir from elsewhere>`` exits with a clear error instead of running the pickle."""
    from graftfl.cli import main

    marker = tmp_path / "pwned"
    write_crafted(tmp_path / "classifier.pt", marker, lambda payload: payload)
    assert main(["serve", "--run", str(tmp_path), "--port", "0"]) == 2
    assert "not a plain weights file" in capsys.readouterr().err
    assert not marker.exists()


def test_plain_files_still_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    extra = {"part": "server", "relay-state": b"\x00ciphertext", "privacy_histories": {"0": "[]"}, "stats": {"n": torch.arange(3)},
             "cursor": 2, "privacy_history": [(1.1, 0.01, 5)], "participants": {0: model.state_dict()}, "nothing": None}
    save_checkpoint(tmp_path, 4, model.state_dict(), extra)
    loaded = load_checkpoint(tmp_path)
    assert loaded["round"] == 4 and loaded["extra"]["relay-state"] == b"\x00ciphertext" and loaded["extra"]["cursor"] == 2
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())

    classifier = feature_classifier(4, 3, [8])
    save_classifier(tmp_path / "classifier.pt", classifier, 4, 3, [8], version=2)
    restored, stored = load_classifier(tmp_path / "classifier.pt")
    assert stored["version"] == 2 and all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), restored.state_dict().values(), strict=True))

    autoencoder = conv_ae((1, 8, 8), latent_dim=4, channels=2)
    save_autoencoder(tmp_path / "ae.pt", autoencoder, (1, 8, 8), 2, ([0.5], [0.25]))
    _, stored = load_autoencoder(tmp_path / "ae.pt")
    assert stored["normalisation"] == ([0.5], [0.25]) and stored["input_shape"] == [1, 8, 8]


def test_pickle_module_is_not_an_escape_hatch(tmp_path):
    """A raw (non-zip) pickle naming a global is refused too."""
    marker = tmp_path / "pwned"
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps(_PlantsMarker(marker), protocol=2))
    with pytest.raises(UnsafeWeightsFile):
        load_checkpoint(tmp_path)
    assert not marker.exists()
