"""Reading a site's folder: format detection, the three layouts, and image decoding.

Layouts (``dataset.format``, default ``auto``):

- ``folder``: an image-folder tree ``<class>/<image>`` (torchvision ``ImageFolder``);
- ``manifest``: ``manifest.csv`` with columns ``path,label[,patient_id][,split]``, paths relative
  to the site's folder, label a class name or an integer index, split ``train`` or ``test``;
- ``hf``: a directory written by Hugging Face ``datasets`` ``save_to_disk`` (what
  ``flwr-datasets create`` writes), a ``Dataset`` or a ``DatasetDict`` with train/test splits.

``auto`` picks ``manifest`` when ``manifest.csv`` exists, ``hf`` when the folder holds
``dataset_dict.json`` or ``state.json``, else ``folder``. PNG/JPEG (anything Pillow reads) and
DICOM (``.dcm``, through pydicom: ``pip install graftfl[dicom]``) work in folder and manifest
layouts. Every error is a :class:`SiteDataError` naming the site, the file and what was expected.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
MANIFEST_NAME = "manifest.csv"
FORMATS = ("auto", "folder", "manifest", "hf")
SPLITS = ("train", "test")
IMAGE_COLUMN_GUESSES = ("image", "img", "pixel_values", "pixels")
LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "class", "target")


class SiteDataError(ValueError):
    """A site's data is missing or does not match the declaration; the message says what was expected."""


@dataclass(frozen=True)
class SourceRecord:
    """One image as a layout lists it, before decoding.

    ``ref`` is the path relative to the site folder (folder, manifest) or ``<split>/<row>``
    (hf); ``label`` is the raw label (class name or index) as written there.
    """

    ref: str
    label: Any
    patient_id: str | None = None
    split: str | None = None


def detect_format(data_path: Path, fmt: str = "auto") -> str:
    """The layout of ``data_path``: ``fmt`` itself unless it is ``auto``."""
    if fmt not in FORMATS:
        raise SiteDataError(f"dataset.format={fmt!r} is not a site data format; valid formats: {list(FORMATS)}")
    if fmt != "auto":
        return fmt
    if (data_path / MANIFEST_NAME).is_file():
        return "manifest"
    if (data_path / "dataset_dict.json").is_file() or (data_path / "state.json").is_file():
        return "hf"
    return "folder"


def _hidden(name: str) -> bool:
    return name.startswith(".")


def folder_classes(data_path: Path, site: str) -> list[str]:
    """Class folder names of an image-folder tree, sorted as torchvision's ``find_classes`` sorts them.

    Unlike torchvision, hidden folders (such as the ``.graftfl-cache``) are not classes.
    """
    names = sorted(entry.name for entry in os.scandir(data_path) if entry.is_dir() and not _hidden(entry.name))
    if not names:
        raise SiteDataError(
            f"site {site}: data-path={data_path} holds no class folders; expected an image-folder tree "
            f"<class>/<image> (PNG/JPEG/DICOM), a {MANIFEST_NAME}, or a Hugging Face save_to_disk directory"
        )
    return names


def list_folder(data_path: Path, site: str) -> list[SourceRecord]:
    """Every image of a ``<class>/<image>`` tree (sub-folders of a class included), in a stable order."""
    records = []
    for class_name in folder_classes(data_path, site):
        for root, dirs, files in os.walk(data_path / class_name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for name in sorted(files):
                if not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS + DICOM_EXTENSIONS):
                    records.append(SourceRecord(ref=os.path.relpath(os.path.join(root, name), data_path), label=class_name))
    if not records:
        raise SiteDataError(
            f"site {site}: data-path={data_path} has class folders but no images in them; expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)}"
        )
    return records


def _inside(data_path: Path, relative: str, where: str, site: str) -> str:
    """A manifest path, checked to stay inside the site folder (no absolute paths, no '..')."""
    pure = Path(relative)
    if not relative or pure.is_absolute() or ".." in pure.parts:
        raise SiteDataError(f"site {site}: {where}: path {relative!r} must be relative to data-path={data_path} and stay inside it")
    return pure.as_posix()


def list_manifest(data_path: Path, site: str) -> list[SourceRecord]:
    """The rows of ``manifest.csv``: path and label required; patient_id and split optional."""
    manifest = data_path / MANIFEST_NAME
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise SiteDataError(f"site {site}: {manifest} lacks column(s) {missing}; expected a header path,label[,patient_id][,split], got {columns}")
        records = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            where = f"{manifest} line {line}"
            split = row.get("split") or None
            if split is not None and split.lower() not in SPLITS:
                raise SiteDataError(f"site {site}: {where}: split {split!r} is not one of {list(SPLITS)}")
            if row["label"] == "":
                raise SiteDataError(f"site {site}: {where}: empty label; expected a class name or an integer index")
            records.append(
                SourceRecord(
                    ref=_inside(data_path, row["path"], where, site),
                    label=row["label"],
                    patient_id=row.get("patient_id") or None,
                    split=split.lower() if split else None,
                )
            )
    if not records:
        raise SiteDataError(f"site {site}: {manifest} lists no images; expected one row per image under the header path,label[,patient_id][,split]")
    has_patients = [r.patient_id is not None for r in records]
    if any(has_patients) and not all(has_patients):
        line = has_patients.index(False) + 2
        raise SiteDataError(f"site {site}: {manifest} line {line}: patient_id is empty; give every row a patient_id or none")
    return records


# ----------------------------------------------------------------- decoding ---


def _pil_to_array(image, where: str, site: str) -> tuple[np.ndarray, bool]:
    """An H x W x C float32 array in [0, 1] from a Pillow image, and whether it was 8-bit."""
    mode = image.mode
    if mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0, True
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise SiteDataError(f"site {site}: {where}: integer image mode {mode} with values outside 0..65535")
        return (values / 65535.0).astype(np.float32)[..., None], False
    if mode == "F":
        raise SiteDataError(f"site {site}: {where}: floating-point images (mode F) are not supported; expected 8- or 16-bit PNG/JPEG or DICOM")
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, True


def _dicom_to_array(path: Path, where: str, site: str) -> tuple[np.ndarray, bool]:
    try:
        import pydicom
    except ImportError as err:
        raise SiteDataError(f"site {site}: {where} is DICOM, but pydicom is not installed; install the extra: pip install 'graftfl[dicom]'") from err
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as err:  # pydicom raises many types for unreadable or compressed files
        raise SiteDataError(f"site {site}: {where}: cannot read DICOM pixel data ({type(err).__name__}: {err})") from err
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        raise SiteDataError(f"site {site}: {where}: multi-frame DICOM ({frames} frames); expected one 2-D image per file")
    bits = int(getattr(dataset, "BitsStored", 8 * pixels.dtype.itemsize))
    signed = int(getattr(dataset, "PixelRepresentation", 0)) == 1
    low = -(2 ** (bits - 1)) if signed else 0
    high = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    values = (pixels.astype(np.float64) - low) / float(high - low)  # the stored range, not the image's: comparable across files
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = 1.0 - values  # MONOCHROME1: 0 is white
    values = values.clip(0.0, 1.0).astype(np.float32)
    if samples == 1:
        values = values[..., None]
    return values, bits == 8 and not signed


def decode_image(source: Any, where: str, site: str) -> tuple[np.ndarray, bool]:
    """Decode a file path (PNG/JPEG/... or DICOM), a Pillow image or an array to H x W x C float32 in [0, 1].

    Returns the array and whether the source held 8-bit values (cached as uint8, exactly).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Path):
        if not source.is_file():
            raise SiteDataError(f"site {site}: {where}: file not found")
        if source.suffix.lower() in DICOM_EXTENSIONS:
            return _dicom_to_array(source, where, site)
        try:
            with Image.open(source) as image:
                image.load()
                return _pil_to_array(image, where, site)
        except (UnidentifiedImageError, OSError) as err:
            raise SiteDataError(f"site {site}: {where}: not a readable image ({err})") from err
    if isinstance(source, Image.Image):
        return _pil_to_array(source, where, site)
    array = np.asarray(source)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise SiteDataError(f"site {site}: {where}: expected an H x W or H x W x C image, got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0, True
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0, False
    if np.issubdtype(array.dtype, np.integer):  # e.g. nested lists: the bit depth is lost, values tell it
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 65535:
            raise SiteDataError(f"site {site}: {where}: integer pixel values must lie in 0..255 or 0..65535, got [{low}, {high}]")
        return (array.astype(np.float32) / 255.0, True) if high <= 255 else (array.astype(np.float32) / 65535.0, False)
    array = array.astype(np.float32)
    if array.size and (array.min() < 0 or array.max() > 1):
        raise SiteDataError(f"site {site}: {where}: non-8-bit pixel values must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return array, False


def fit_to_declaration(image: np.ndarray, input_shape: tuple[int, int, int], resize: str, where: str, site: str) -> tuple[torch.Tensor, bool]:
    """H x W x C array -> C x H x W tensor of the declared shape, or a refusal naming the file.

    ``resize='refuse'``: channels and size must match exactly. ``resize='resize'``: grey <-> RGB
    conversion and bilinear (antialiased) resizing. Returns the tensor and whether it was changed.
    """
    channels, height, width = input_shape
    if image.shape[2] == 4:  # RGBA arrays: the alpha channel carries no class information
        image = image[..., :3]
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    got = tuple(tensor.shape)
    if got == tuple(input_shape):
        return tensor, False
    if resize != "resize":
        raise SiteDataError(
            f"site {site}: {where}: image is {got[0]}x{got[1]}x{got[2]} (channels x height x width), "
            f"expected dataset.input_shape={list(input_shape)}; resize or remove it, or set dataset.resize=resize"
        )
    if tensor.shape[0] != channels:
        if channels == 1:
            tensor = (tensor * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=0, keepdim=True)
        elif tensor.shape[0] == 1:
            tensor = tensor.expand(channels, -1, -1)
        else:
            raise SiteDataError(f"site {site}: {where}: cannot convert {tensor.shape[0]} channels to {channels}")
    if tuple(tensor.shape[1:]) != (height, width):
        tensor = torch.nn.functional.interpolate(tensor[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    return tensor.clamp(0.0, 1.0).contiguous(), True
