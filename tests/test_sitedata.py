"""Site-owned data (issue 12): layouts, declaration checks, held-out part, cache, normalization moments."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from graftfl.core.site_stats import (
    ChannelMoments,
    MomentsError,
    channel_moments,
    combine_moments,
)
from graftfl.core.sitedata import (
    SiteDataError,
    SiteDeclaration,
    held_out_mask,
    load_site_data,
    site_data_from_config,
)
from tests.site_fixtures import (
    image_folder,
    manifest_folder,
    random_images,
    write_dicom,
    write_png,
)

GREY_8 = SiteDeclaration(input_shape=(1, 8, 8), num_classes=10)


def by_file(data):
    return {name: (data.x[row], int(data.y[row])) for row, name in enumerate(data.files)}


# ----------------------------------------------------------------- layouts ---


def test_image_folder_loads_pixels_and_integer_class_folders(tmp_path):
    written = image_folder(tmp_path, {"0": 3, "3": 2, "9": 4})
    data = load_site_data(tmp_path, GREY_8, "site-0", site_fraction=0.0)
    assert data.format == "folder" and data.x.shape == (9, 1, 8, 8) and data.x.dtype == torch.float32
    assert data.patient_ids is None and not data.test_mask.any()
    for name, (x, y) in by_file(data).items():
        assert y == int(name.split("/")[0])
        assert torch.equal(x[0], torch.from_numpy(written[name]).float() / 255)


def test_image_folder_with_names_follows_declared_classes_or_torchvision_order(tmp_path):
    image_folder(tmp_path, {"cat": 2, "ant": 2, "dog": 1})
    undeclared = load_site_data(tmp_path, SiteDeclaration((1, 8, 8), 3), "site-0", use_cache=False)
    assert {f.split("/")[0]: y for f, (_, y) in by_file(undeclared).items()} == {"ant": 0, "cat": 1, "dog": 2}
    declared = load_site_data(tmp_path, SiteDeclaration((1, 8, 8), 4, classes=("dog", "cat", "bird", "ant")), "site-0", use_cache=False)
    assert {f.split("/")[0]: y for f, (_, y) in by_file(declared).items()} == {"dog": 0, "cat": 1, "ant": 3}
    with pytest.raises(SiteDataError, match=r"site site-0: .*class folders \['ant', 'cat', 'dog'\], expected dataset.num_classes=4.*dataset.classes"):
        load_site_data(tmp_path, SiteDeclaration((1, 8, 8), 4), "site-0", use_cache=False)


def test_manifest_with_patients_splits_and_mixed_labels(tmp_path):
    rows = [
        {"path": "img/a.png", "label": "2", "patient_id": "p1", "split": "train"},
        {"path": "img/b.png", "label": "benign", "patient_id": "p1", "split": "train"},
        {"path": "img/c.png", "label": "malignant", "patient_id": "p2", "split": "test"},
        {"path": "img/sub/d.png", "label": "0", "patient_id": "p3", "split": ""},
    ]
    written = manifest_folder(tmp_path, rows)
    declaration = SiteDeclaration((1, 8, 8), 3, classes=("benign", "malignant", "other"))
    data = load_site_data(tmp_path, declaration, "site-1")
    assert data.format == "manifest" and data.files == [r["path"] for r in rows]
    assert data.y.tolist() == [2, 0, 1, 0] and data.patient_ids == ["p1", "p1", "p2", "p3"]
    assert data.test_mask.tolist() == [False, False, True, False]
    assert torch.equal(data.test_part()[0][0, 0], torch.from_numpy(written["img/c.png"]).float() / 255)
    assert data.train_part()[0].shape == (3, 1, 8, 8)


def test_manifest_paths_must_stay_inside_the_site_folder(tmp_path):
    write_png(tmp_path / "outside.png", random_images(1)[0])
    site = tmp_path / "site"
    manifest_folder(site, [{"path": "a.png", "label": "1"}])
    (site / "manifest.csv").write_text("path,label\na.png,1\n../outside.png,1\n")
    with pytest.raises(SiteDataError, match=r"manifest.csv line 3: path '../outside.png' must be relative to data-path"):
        load_site_data(site, GREY_8, "site-2")


def test_hugging_face_save_to_disk_with_train_and_test_splits(tmp_path):
    import datasets
    from PIL import Image

    images = random_images(6)
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["no", "yes"]), "patient_id": datasets.Value("string")})

    def part(rows):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(images[r]) for r in rows], "fine": [r % 2 for r in rows], "patient_id": [f"p{r}" for r in rows]}, features=features
        )

    datasets.DatasetDict({"train": part([0, 1, 2, 3]), "test": part([4, 5])}).save_to_disk(str(tmp_path / "hf"))
    declaration = SiteDeclaration((1, 8, 8), 2, classes=("yes", "no"))  # ClassLabel names are mapped onto the declared order
    data = load_site_data(tmp_path / "hf", declaration, "site-3")
    assert data.format == "hf" and len(data) == 6
    assert data.test_mask.tolist() == [False] * 4 + [True] * 2
    assert data.y.tolist() == [1, 0, 1, 0, 1, 0] and data.patient_ids == [f"p{r}" for r in range(6)]
    assert torch.equal(data.x[5, 0], torch.from_numpy(images[5]).float() / 255)
    assert load_site_data(tmp_path / "hf", declaration, "site-3").from_cache  # a cached HF load decodes no image
    with pytest.raises(SiteDataError, match="dataset.label_column='nope' is not a column"):
        load_site_data(tmp_path / "hf", SiteDeclaration((1, 8, 8), 2, label_column="nope"), "site-3")


def test_dicom_in_folder_and_manifest_layouts(tmp_path):
    pixels = (np.arange(64).reshape(8, 8) * 64).astype(np.uint16)  # 12-bit values 0..4032
    write_dicom(tmp_path / "folder" / "1" / "scan.dcm", pixels)
    write_png(tmp_path / "folder" / "0" / "photo.png", random_images(1)[0])
    data = load_site_data(tmp_path / "folder", GREY_8, "site-0")
    scan = by_file(data)["1/scan.dcm"]
    assert scan[1] == 1 and torch.allclose(scan[0][0], torch.from_numpy(pixels / 4095.0).float(), atol=1e-6)

    write_dicom(tmp_path / "manifest" / "ct" / "s1.dcm", pixels, bits=16)
    (tmp_path / "manifest" / "manifest.csv").write_text("path,label,patient_id\nct/s1.dcm,7,px\n")
    data = load_site_data(tmp_path / "manifest", GREY_8, "site-1")
    assert data.y.tolist() == [7] and torch.allclose(data.x[0, 0], torch.from_numpy(pixels / 65535.0).float(), atol=1e-6)


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch):
    write_dicom(tmp_path / "1" / "scan.dcm", np.zeros((8, 8), dtype=np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(SiteDataError, match=r"site site-4: .*scan.dcm is DICOM, but pydicom is not installed.*graftfl\[dicom\]"):
        load_site_data(tmp_path, GREY_8, "site-4", use_cache=False)


# ---------------------------------------------------------- declaration ---


def test_wrong_shape_is_refused_naming_site_file_and_expected_shape(tmp_path):
    image_folder(tmp_path, {"0": 2})
    write_png(tmp_path / "1" / "big.png", random_images(1, shape=(10, 12))[0])
    with pytest.raises(SiteDataError, match=r"site site-5: .*1/big.png: image is 1x10x12 .*expected dataset.input_shape=\[1, 8, 8\].*dataset.resize=resize"):
        load_site_data(tmp_path, GREY_8, "site-5")
    resized = load_site_data(tmp_path, SiteDeclaration((1, 8, 8), 10, resize="resize"), "site-5")
    assert resized.x.shape == (3, 1, 8, 8) and 0 <= float(resized.x.min()) and float(resized.x.max()) <= 1


def test_colour_image_under_a_grey_declaration_is_refused_or_converted(tmp_path):
    write_png(tmp_path / "2" / "rgb.png", random_images(1, channels=3)[0])
    with pytest.raises(SiteDataError, match=r"rgb.png: image is 3x8x8"):
        load_site_data(tmp_path, GREY_8, "site-6")
    assert load_site_data(tmp_path, SiteDeclaration((1, 8, 8), 10, resize="resize"), "site-6").x.shape == (1, 1, 8, 8)


def test_unknown_class_is_refused_naming_the_file(tmp_path):
    image_folder(tmp_path / "folder", {"0": 1, "12": 1})
    with pytest.raises(SiteDataError, match=r"site site-7: .*12/000.png: unknown class '12'; expected an integer index in \[0, 10\)"):
        load_site_data(tmp_path / "folder", GREY_8, "site-7")
    manifest_folder(tmp_path / "manifest", [{"path": "a.png", "label": "benign"}, {"path": "b.png", "label": "cat"}])
    with pytest.raises(SiteDataError, match=r"site site-7: .*b.png: unknown class 'cat'; expected one of dataset.classes=\['benign', 'malignant'\]"):
        load_site_data(tmp_path / "manifest", SiteDeclaration((1, 8, 8), 2, classes=("benign", "malignant")), "site-7")


def test_missing_data_path_names_the_node_config_key(tmp_path):
    with pytest.raises(SiteDataError, match=r"site node-3: node-config key 'data-path' is not set.*--node-config \"data-path="):
        site_data_from_config({"partition-id": 0}, {"input_shape": [1, 8, 8], "num_classes": 10}, "node-3")
    with pytest.raises(SiteDataError, match=r"site node-3: data-path=.*nowhere \(node-config\) does not exist"):
        load_site_data(tmp_path / "nowhere", GREY_8, "node-3")


def test_empty_folder_and_empty_class_folders_are_refused(tmp_path):
    with pytest.raises(SiteDataError, match=r"site site-8: data-path=.* holds no class folders"):
        load_site_data(tmp_path, GREY_8, "site-8")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "notes.txt").write_text("not an image")
    with pytest.raises(SiteDataError, match=r"site site-8: data-path=.* has class folders but no images"):
        load_site_data(tmp_path, GREY_8, "site-8")
    (tmp_path / "manifest.csv").write_text("path,label\n")
    with pytest.raises(SiteDataError, match=r"site site-8: .*manifest.csv lists no images"):
        load_site_data(tmp_path, GREY_8, "site-8")


def test_declaration_from_config_checks_its_own_values():
    assert SiteDeclaration.from_config({"input_shape": [3, 32, 32], "num_classes": 2, "classes": ["a", "b"]}).classes == ("a", "b")
    with pytest.raises(SiteDataError, match=r"dataset.input_shape must be \[channels, height, width\]"):
        SiteDeclaration.from_config({"input_shape": [8, 8], "num_classes": 10})
    with pytest.raises(SiteDataError, match=r"dataset.resize='stretch'; valid policies: \['refuse', 'resize'\]"):
        SiteDeclaration((1, 8, 8), 10, resize="stretch")
    with pytest.raises(SiteDataError, match=r"dataset.classes must list dataset.num_classes=3"):
        SiteDeclaration((1, 8, 8), 3, classes=("a", "b"))


# ------------------------------------------------------------- held out ---


def test_held_out_fraction_keeps_each_patient_on_one_side_and_ignores_row_order():
    rng = np.random.default_rng(1)
    patients = [f"p{int(i)}" for i in rng.integers(0, 60, size=400)]
    files = [f"f{i}.png" for i in range(400)]
    mask = held_out_mask(400, [None] * 400, patients, files, 0.25, seed=3)
    held = {p for p, m in zip(patients, mask.tolist(), strict=True) if m}
    assert all(m == (p in held) for p, m in zip(patients, mask.tolist(), strict=True))  # a patient is never on both sides
    assert 0.2 <= float(mask.float().mean()) <= 0.35
    order = rng.permutation(400)
    shuffled = held_out_mask(400, [None] * 400, [patients[i] for i in order], [files[i] for i in order], 0.25, seed=3)
    assert torch.equal(shuffled, mask[order])
    assert not torch.equal(held_out_mask(400, [None] * 400, patients, files, 0.25, seed=4), mask)
    by_file = held_out_mask(400, [None] * 400, None, files, 0.25, seed=3)
    assert int(by_file.sum()) == 100


def test_explicit_split_column_wins_over_the_fraction():
    mask = held_out_mask(3, ["train", "test", None], ["a", "b", "c"], ["x", "y", "z"], 0.9)
    assert mask.tolist() == [False, True, False]


# ---------------------------------------------------------------- cache ---


def test_cache_serves_identical_tensors_and_follows_file_content(tmp_path):
    image_folder(tmp_path, {"0": 3, "1": 3})
    first = load_site_data(tmp_path, GREY_8, "site-0")
    second = load_site_data(tmp_path, GREY_8, "site-0")
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)

    changed = random_images(1, seed=9)[0]
    write_png(tmp_path / "1" / "001.png", changed)  # new content: a new key, the new pixels
    third = load_site_data(tmp_path, GREY_8, "site-0")
    assert not third.from_cache and torch.equal(by_file(third)["1/001.png"][0][0], torch.from_numpy(changed).float() / 255)

    write_png(tmp_path / "0" / "new.png", changed)
    assert len(load_site_data(tmp_path, GREY_8, "site-0")) == 7
    (tmp_path / "0" / "new.png").unlink()
    fourth = load_site_data(tmp_path, GREY_8, "site-0")
    assert len(fourth) == 6 and fourth.from_cache and torch.equal(fourth.x, third.x)


def test_content_change_hidden_behind_the_same_size_and_mtime_needs_verify(tmp_path):
    image_folder(tmp_path, {"0": 2})
    target = tmp_path / "0" / "000.png"
    load_site_data(tmp_path, GREY_8, "site-0")
    stat = target.stat()
    original = target.read_bytes()
    tampered = bytearray(original)
    tampered[-20] ^= 0xFF  # inside the IEND/IDAT tail: same size, different bytes
    target.write_bytes(bytes(tampered))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_site_data(tmp_path, GREY_8, "site-0").from_cache  # documented: size + mtime are trusted
    with pytest.raises(SiteDataError):  # verify re-hashes the bytes: a new key, the damaged PNG is decoded and refused
        load_site_data(tmp_path, GREY_8, "site-0", verify_cache=True)


def test_cache_dir_from_node_config_and_read_only_data(tmp_path):
    image_folder(tmp_path / "data", {"4": 2})
    node_config = {"data-path": str(tmp_path / "data"), "cache-dir": str(tmp_path / "cache")}
    declared = {"input_shape": [1, 8, 8], "num_classes": 10}
    assert not site_data_from_config(node_config, declared, "site-0").from_cache
    assert site_data_from_config(node_config, declared, "site-0").from_cache
    assert any((tmp_path / "cache").glob("*.pt")) and not (tmp_path / "data" / ".graftfl-cache").exists()
    if os.geteuid() != 0:  # root ignores permissions
        os.chmod(tmp_path / "data", 0o555)
        try:
            data = load_site_data(tmp_path / "data", GREY_8, "site-0")  # no cache possible: still loads
            assert len(data) == 2 and not data.from_cache
        finally:
            os.chmod(tmp_path / "data", 0o755)


def test_damaged_cache_entry_is_decoded_again(tmp_path):
    image_folder(tmp_path, {"0": 2})
    reference = load_site_data(tmp_path, GREY_8, "site-0")
    for entry in (tmp_path / ".graftfl-cache").glob("*.pt"):
        entry.write_bytes(b"not a torch file")
    again = load_site_data(tmp_path, GREY_8, "site-0")
    assert not again.from_cache and torch.equal(again.x, reference.x)


# ------------------------------------------------------- normalization ---


def test_federated_moments_give_the_pooled_mean_and_std():
    generator = torch.Generator().manual_seed(0)
    sites = [torch.rand(n, 3, 8, 8, generator=generator) ** (k + 1) for k, n in enumerate((50, 7, 131))]
    mean, std = combine_moments([ChannelMoments.from_dict(channel_moments(x).as_dict(), channels=3) for x in sites])
    pooled = torch.cat(sites).to(torch.float64)
    assert np.allclose(mean, pooled.mean(dim=(0, 2, 3)).tolist(), rtol=0, atol=1e-9)
    assert np.allclose(std, pooled.std(dim=(0, 2, 3)).tolist(), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"count": 10, "sum": [11.0], "sum_sq": [5.0]}, r"must lie in \[0, count=10\]"),
        ({"count": 10, "sum": [float("nan")], "sum_sq": [5.0]}, "must be finite"),
        ({"count": 0, "sum": [0.0], "sum_sq": [0.0]}, "positive integer"),
        ({"count": 10, "sum": [9.0], "sum_sq": [1.0]}, "impossible"),
        ({"count": 10, "sum": [1.0, 2.0], "sum_sq": [1.0, 2.0]}, "expected 1 channel values"),
        ({"count": 10, "sum": "abc"}, "moments need count"),
    ],
)
def test_impossible_moments_are_rejected(values, message):
    with pytest.raises(MomentsError, match=message):
        ChannelMoments.from_dict(values, channels=1, source="site-9")


def test_hugging_face_single_dataset_with_split_column_and_guessed_columns(tmp_path):
    import datasets

    images = random_images(4)
    datasets.Dataset.from_dict(
        {"pixels": [img.tolist() for img in images], "target": [3, 1, 4, 1], "split": ["train", "test", "train", "train"]},
        features=datasets.Features({"pixels": datasets.Array2D((8, 8), "uint8"), "target": datasets.Value("int64"), "split": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path))
    data = load_site_data(tmp_path, GREY_8, "site-3")
    assert data.format == "hf" and data.y.tolist() == [3, 1, 4, 1] and data.test_mask.tolist() == [False, True, False, False]
    assert torch.equal(data.x[2, 0], torch.from_numpy(images[2]).float() / 255) and data.patient_ids is None


def test_manifest_row_without_its_file_names_the_file(tmp_path):
    manifest_folder(tmp_path, [{"path": "a.png", "label": "1"}])
    (tmp_path / "manifest.csv").write_text("path,label\na.png,1\nscans/missing.png,2\n")
    for use_cache in (True, False):
        with pytest.raises(SiteDataError, match=r"site site-2: .*scans/missing.png: file not found"):
            load_site_data(tmp_path, GREY_8, "site-2", use_cache=use_cache)
