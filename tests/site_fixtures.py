"""Small site folders written on the fly for the site-data tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def random_images(count: int, shape=(8, 8), channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = (count, *shape) if channels == 1 else (count, *shape, channels)
    return rng.integers(0, 256, size=size, dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root: Path, per_class: dict[str, int], shape=(8, 8), seed: int = 0) -> dict[str, np.ndarray]:
    """``root/<class>/<n>.png``; returns the pixels written per relative path."""
    written = {}
    images = random_images(sum(per_class.values()), shape, seed=seed)
    number = 0
    for name, count in per_class.items():
        for k in range(count):
            relative = f"{name}/{k:03d}.png"
            write_png(root / relative, images[number])
            written[relative] = images[number]
            number += 1
    return written


def manifest_folder(root: Path, rows: list[dict], shape=(8, 8), seed: int = 0) -> dict[str, np.ndarray]:
    """Images for every row's ``path`` plus ``manifest.csv`` with the rows' columns."""
    images = random_images(len(rows), shape, seed=seed)
    written = {}
    for row, pixels in zip(rows, images, strict=True):
        write_png(root / row["path"], pixels)
        written[row["path"]] = pixels
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return written


def write_dicom(path: Path, pixels: np.ndarray, bits: int = 12) -> Path:
    """A minimal single-frame MONOCHROME2 DICOM file written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientID = "P-TEST"
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(str(path), enforce_file_format=True)
    return path
