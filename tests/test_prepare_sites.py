"""`graftfl prepare-sites`: registry data written out as site folders that load back through core/sitedata."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict

import pytest
import torch
from omegaconf import OmegaConf

from graftfl.cli import main as graftfl_main
from graftfl.core.data import raw_arrays_from_config
from graftfl.core.sitedata import SiteDeclaration, load_site_data

DIGITS = OmegaConf.create({"name": "digits", "root": "data", "download": False})


def manifest_rows(folder):
    with open(folder / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def prepare(tmp_path, *extra):
    out = tmp_path / "sites"
    overrides = [e for e in extra if "=" in e]  # argparse: positional overrides before the options
    options = [e for e in extra if "=" not in e]
    code = graftfl_main(["prepare-sites", "dataset=digits", "num_clients=3", f"out={out}", *overrides, *options])
    assert code == 0
    return out


def test_sites_load_back_with_the_registry_pixels_labels_and_held_out_patients(tmp_path):
    out = prepare(tmp_path, "partition=dirichlet", "--test-fraction", "0.25")
    summary = json.loads((out / "sites.json").read_text())
    assert summary["input_shape"] == [1, 8, 8] and summary["num_classes"] == 10
    declaration = SiteDeclaration.from_config({"input_shape": summary["input_shape"], "num_classes": summary["num_classes"]})
    train_x, train_y, _, _ = raw_arrays_from_config(DIGITS)
    expected = Counter((row.tobytes(), int(label)) for row, label in zip(train_x, train_y, strict=True))
    loaded = Counter()
    for site in range(3):
        data = load_site_data(out / f"site-{site}", declaration, f"site-{site}")
        rows = manifest_rows(out / f"site-{site}")
        assert data.format == "manifest" and data.x.shape[1:] == (1, 8, 8) and len(data) == len(rows) == summary["sites"][site]["images"]
        assert data.y.tolist() == [int(r["label"]) for r in rows]
        pixels = data.x.mul(255).round().to(torch.uint8).numpy()
        loaded.update((p.tobytes(), int(label)) for p, label in zip(pixels, data.y.tolist(), strict=True))
        sides, labels = defaultdict(set), defaultdict(set)
        for patient, held, label in zip(data.patient_ids, data.test_mask.tolist(), data.y.tolist(), strict=True):
            sides[patient].add(held)
            labels[patient].add(label)
        assert all(len(s) == 1 for s in sides.values()) and all(len(s) == 1 for s in labels.values())
        assert len(sides) < len(data)  # several images per patient
        assert 0.1 < float(data.test_mask.float().mean()) < 0.45
    assert loaded == expected  # every training image exactly once, raw pixels (not standardised), same label
    assert not (out / "duplicates.json").exists()


def test_duplicate_fraction_copies_patients_and_writes_the_truth(tmp_path):
    out = prepare(tmp_path, "--duplicate-fraction", "0.2")
    truth = json.loads((out / "duplicates.json").read_text())
    holders, images = defaultdict(set), defaultdict(lambda: defaultdict(set))
    for site in range(3):
        for row in manifest_rows(out / f"site-{site}"):
            holders[row["patient_id"]].add(f"site-{site}")
            images[row["patient_id"]][f"site-{site}"].add((out / f"site-{site}" / row["path"]).read_bytes())
    shared = {patient: sorted(sites) for patient, sites in holders.items() if len(sites) > 1}
    assert shared == {patient: entry["sites"] for patient, entry in truth["patients"].items()}
    assert abs(len(shared) - 0.2 * len(holders)) <= 1
    assert any(len(sites) == 3 for sites in shared.values()) and any(len(sites) == 2 for sites in shared.values())
    for patient, sites in shared.items():
        copies = list(images[patient].values())
        assert len(copies) == len(sites)
        assert all(copy == copies[0] for copy in copies) and len(copies[0]) == truth["patients"][patient]["images"]
    pairs = Counter(f"{a},{b}" for sites in shared.values() for i, a in enumerate(sites) for b in sites[i + 1 :])
    assert dict(pairs) == truth["pairs"]


def test_same_seed_same_folders_other_seed_other_patients(tmp_path):
    first = prepare(tmp_path / "a", "--duplicate-fraction", "0.1")
    second = prepare(tmp_path / "b", "--duplicate-fraction", "0.1")
    third = prepare(tmp_path / "c", "--duplicate-fraction", "0.1", "seed=1")
    for site in range(3):
        manifest = (first / f"site-{site}" / "manifest.csv").read_bytes()
        assert manifest == (second / f"site-{site}" / "manifest.csv").read_bytes()
        assert manifest != (third / f"site-{site}" / "manifest.csv").read_bytes()
    assert (first / "duplicates.json").read_bytes() == (second / "duplicates.json").read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["dataset=digits"], "needs exactly one out=<folder>"),
        (["dataset=digits", "out=OUT", "--duplicate-fraction", "1.5"], "--duplicate-fraction must be in [0, 1]"),
        (["dataset=digits", "num_clients=1", "out=OUT", "--duplicate-fraction", "0.1"], "needs num_clients >= 2"),
        (["dataset=digits", "out=OUT", "--test-fraction", "1"], "--test-fraction must be in [0, 1)"),
    ],
)
def test_bad_arguments_fail_with_a_message(tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path / "sites")) for a in args]
    assert graftfl_main(["prepare-sites", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_non_empty_out_folder_is_kept_unless_forced(tmp_path, capsys):
    out = tmp_path / "sites"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert graftfl_main(["prepare-sites", "dataset=digits", "num_clients=2", f"out={out}"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert graftfl_main(["prepare-sites", "dataset=digits", "num_clients=2", f"out={out}", "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "site-1" / "manifest.csv").exists()
