"""The data plane's one message: a small framed record of named tensors.

Layout of a frame (all integers big-endian)::

    b"GFL1" | u32 header length | header (UTF-8 JSON) | tensor payloads, in header order

The header is ``{"token", "kind", "meta", "tensors": [{"name", "shape", "dtype"}, ...]}``.
Payloads are the raw bytes of :func:`graftfl.core.codec.tensor_to_bytes`, so the
wire dtype (``float32|float16|bfloat16`` for activations and gradients,
``int64`` for labels) travels with each tensor. No protoc is needed: gRPC moves
the frame as opaque bytes and :func:`encode_frame` / :func:`decode_frame` are the
(de)serializers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from graftfl.core.codec import FLOAT_WIRE_DTYPES, WIRE_DTYPES, json_prefixed, tensor_from_bytes, tensor_to_bytes, wire_dtype

MAGIC = b"GFL1"
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_DIMS = 8


class FrameError(ValueError):
    """A frame that cannot be parsed or does not match what the receiver expects."""


@dataclass
class Frame:
    """One data-plane message: a kind, the turn token, named tensors and small JSON extras."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    token: str = ""


def frame_header(frame: Frame, float_dtype: str = "float32") -> dict:
    """The header :func:`encode_frame` writes for ``frame``: floating tensors in ``float_dtype``, others as int64."""
    if float_dtype not in FLOAT_WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {list(FLOAT_WIRE_DTYPES)}, got '{float_dtype}'")
    entries = [{"name": name, "shape": list(tensor.shape), "dtype": float_dtype if tensor.is_floating_point() else "int64"}
               for name, tensor in frame.tensors.items()]
    return {"token": frame.token, "kind": frame.kind, "meta": frame.meta, "tensors": entries}


def encode_frame(frame: Frame, float_dtype: str = "float32") -> bytes:
    """Serialize ``frame``; floating tensors are cast to ``float_dtype`` on the wire."""
    header = frame_header(frame, float_dtype)
    payloads = [tensor_to_bytes(frame.tensors[entry["name"]], entry["dtype"]) for entry in header["tensors"]]
    text = json.dumps(header).encode()
    return b"".join([MAGIC, struct.pack(">I", len(text)), text, *payloads])


def as_delivered(frame: Frame, float_dtype: str = "float32") -> tuple[dict, Frame, int]:
    """What the receiver of ``encode_frame(frame, float_dtype)`` parses, without the bytes: ``(header, frame, size)``.

    The header as :func:`parse_header` returns it (and with its checks), the frame as
    :func:`decode_frame` returns it (tensors are copies, rounded to the wire dtype and
    widened back to float32) and the encoded size in bytes. The in-memory data plane
    (:mod:`graftfl.transport.direct`) hands frames over with it; the copies and the
    size are what a frame through gRPC would give, so the checks and counts are the same.
    """
    header, text_length = _delivered_header(frame, float_dtype)
    tensors = {entry["name"]: _delivered(frame.tensors[entry["name"]], entry["dtype"]) for entry in header["tensors"]}
    size = 8 + text_length + sum(math.prod(entry["shape"]) * wire_dtype(entry["dtype"]).itemsize for entry in header["tensors"])
    delivered = Frame(kind=header["kind"], tensors=tensors, meta=dict(header.get("meta") or {}), token=str(header.get("token", "")))
    return header, delivered, size


_HEADERS: dict[tuple, tuple[dict, int]] = {}  # a meta-less frame's (token, kind, tensor entries) -> (checked header, text length)
_HEADERS_KEPT = 64
_JSON_SCALARS = (str, int, float, bool, type(None))


def _delivered_header(frame: Frame, float_dtype: str) -> tuple[dict, int]:
    """``(header as parsed and checked, length of its JSON text)`` for :func:`as_delivered`.

    The JSON round trip is what makes the header the parsed one (tuples become lists, keys
    strings); it is skipped where it cannot change anything: a header without meta, or with
    flat meta of JSON scalars (floats keep their value through ``json``). A split turn sends
    the same meta-less header at every full batch, so its text length and checks are kept
    (about 40 µs a LeNet step of batch 10).
    """
    built = frame_header(frame, float_dtype)
    plain = type(frame.token) is str and type(frame.kind) is str and type(frame.meta) is dict
    if plain and not frame.meta:
        key = (frame.token, frame.kind, tuple((e["name"], tuple(e["shape"]), e["dtype"]) for e in built["tensors"]))
        cached = _HEADERS.get(key) if all(type(name) is str for name, _, _ in key[2]) else None
        if cached is None:
            text_length = len(json.dumps(built).encode())
            cached = checked_header(built, text_length), text_length
            while len(_HEADERS) >= _HEADERS_KEPT:
                _HEADERS.pop(next(iter(_HEADERS)), None)
            _HEADERS[key] = cached
        return cached
    if plain and all(type(k) is str for k in frame.meta) and all(type(v) in _JSON_SCALARS for v in frame.meta.values()):
        text_length = len(json.dumps(built).encode())
        return checked_header({**built, "meta": dict(frame.meta)}, text_length), text_length
    text = json.dumps(built).encode()
    return checked_header(json.loads(text), len(text)), len(text)


def _delivered(tensor: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """``tensor`` as :func:`~graftfl.core.codec.tensor_from_bytes` returns it after the wire: a copy, floats widened to float32."""
    copy = tensor.detach().to("cpu", wire_dtype(dtype_name), copy=True)
    return copy.to(torch.float32) if copy.is_floating_point() else copy


def parse_header(raw: bytes) -> tuple[dict, int]:
    """The JSON header of ``raw`` and the offset of the first payload byte."""
    header, offset = json_prefixed(raw, MAGIC, MAX_HEADER_BYTES, "data-plane frame", "frame header", FrameError)
    return checked_header(header, offset - 8), offset


def checked_header(header, length: int) -> dict:
    """``header`` (parsed JSON of ``length`` bytes) once its fields are valid; else :class:`FrameError`."""
    if length > MAX_HEADER_BYTES:
        raise FrameError(f"frame header length {length} is invalid")
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str) or not isinstance(header.get("tensors", []), list):
        raise FrameError("frame header needs a 'kind' string and a 'tensors' list")
    if not isinstance(header.get("meta", {}), dict) or not isinstance(header.get("token", ""), str):
        raise FrameError("frame header 'meta' must be an object and 'token' a string")
    names = [_checked_entry(entry) for entry in header.get("tensors", [])]
    if len(set(names)) != len(names):
        raise FrameError(f"frame header names a tensor twice: {names}")
    return header


def _checked_entry(entry) -> str:
    """Validate one ``tensors`` entry of a header; returns its name.

    Shapes must be lists of non-negative JSON integers (``2.7``, ``"8"`` or ``true``
    are refused, not truncated or coerced) with at least one element in total:
    no graftfl frame carries an empty tensor.
    """
    if not isinstance(entry, dict):
        raise FrameError(f"each 'tensors' entry must be an object with name, shape and dtype, got {type(entry).__name__}: {entry!r:.80}")
    name, shape, dtype = entry.get("name"), entry.get("shape"), entry.get("dtype")
    if not isinstance(name, str) or not name:
        raise FrameError(f"tensor entry needs a non-empty 'name' string, got {name!r:.80}")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise FrameError(f"tensor '{name}': dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r:.40}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS:
        raise FrameError(f"tensor '{name}': shape must be a list of at most {MAX_TENSOR_DIMS} integers, got {shape!r:.80}")
    if any(type(d) is not int or d < 0 for d in shape):  # type(...) is int: bool and float are not sizes
        raise FrameError(f"tensor '{name}': shape values must be non-negative integers, got {shape!r:.80}")
    if math.prod(shape) == 0:
        raise FrameError(f"tensor '{name}' has no elements (shape {shape}); empty tensors are not valid frames")
    return name


def decode_tensors(header: dict, raw: bytes, offset: int) -> dict[str, torch.Tensor]:
    """The tensors of a parsed frame (floating ones widened to float32)."""
    tensors: dict[str, torch.Tensor] = {}
    view = memoryview(raw)  # slices of a memoryview do not copy; tensor_from_bytes copies once
    for entry in header.get("tensors", []):  # entries were checked by parse_header
        name, shape, dtype = entry["name"], entry["shape"], entry["dtype"]
        size = math.prod(shape) * wire_dtype(dtype).itemsize
        if offset + size > len(raw):
            raise FrameError(f"tensor '{name}' ({shape}, {dtype}) runs past the end of the frame")
        tensors[name] = tensor_from_bytes(view[offset : offset + size], shape, dtype)
        offset += size
    if offset != len(raw):
        raise FrameError(f"frame has {len(raw) - offset} trailing bytes")
    return tensors


def decode_frame(raw: bytes) -> Frame:
    """Inverse of :func:`encode_frame` (no validation beyond well-formedness)."""
    header, offset = parse_header(raw)
    return Frame(kind=header["kind"], tensors=decode_tensors(header, raw, offset), meta=header.get("meta") or {}, token=str(header.get("token", "")))


def wire_dtypes_of(header: dict) -> dict[str, str]:
    """``{tensor name: wire dtype}`` as declared in a frame header."""
    return {entry["name"]: entry["dtype"] for entry in header.get("tensors", [])}  # entries checked by parse_header
