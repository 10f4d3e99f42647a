"""A state dict as a few flat arrays and a layout, so a model travels as a handful of objects instead of hundreds.

Flower 1.42 sends a record as a tree of objects, one request per object (at most two at a time on a 2-core machine),
on each of a message's three hops each way (centre -> SuperLink -> SuperNode -> ClientApp). One array per tensor made
a model message ~300 objects: on a loaded 2-core loopback deployment a message there and back took ~26 s against ~9 s
packed (bench/results/transfer.md). Packed, the model is one 1-D array per dtype (tensors concatenated in the layout's
order, so each keeps its dtype exactly: float32 weights and e.g. int64 counters travel apart), under the keys
:data:`~braintumnet.protocol.PACKED_PREFIX` + dtype. The layout (each tensor's name, dtype, shape and offset into its
dtype's array, UTF-8 JSON: :func:`encode_layout`) travels once, in the instruction's config record
(:data:`~braintumnet.protocol.PACKED_LAYOUT`), which the message carries anyway; the site packs its reply in that
same layout (:func:`pack` with ``layout``) and sends no layout back, since the centre knows what it sent. An Array
costs two objects (the array and its chunk), so a round trip moves four objects fewer than with the layout as an
array both ways. Each array's key also names the layout it is laid out in (``packed.float32@`` and the first 16 hex
digits of the layout's SHA-256), so arrays laid out in another layout, say by a site whose model lists its tensors in
another order, are refused by name even where their lengths match.

:func:`unpack` trusts nothing it receives: the layout must parse (:func:`decode_layout`), describe distinct names with
known numeric dtypes and shapes laid end to end, and the arrays must be exactly the ones it describes. Anything else
raises :class:`PackingError` with what is wrong.

Framework-free: numpy only (torch CPU tensors are accepted as inputs; the results are numpy arrays).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from braintumnet.errors import BrainTumNetError
from braintumnet.protocol import PACKED_PREFIX

LAYOUT_FORMAT = 1
# Plain numeric dtypes only: a layout naming anything else (object, structured, string) is refused.
DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                    "float32", "float64", "complex64", "complex128"})
MAX_LAYOUT_BYTES = 4 * 2**20  # ~200 bytes a tensor: room for ~20,000 tensors
MAX_NDIM = 32  # numpy's own limit is 64


class PackingError(BrainTumNetError):
    """A packed model that cannot be unpacked as it claims: malformed, or not the model expected."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a packed model: its name, dtype, shape and offset (elements) into its dtype's array."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


Layout = tuple[Entry, ...]


def layout_of(state: Mapping[str, Any]) -> Layout:
    """The layout :func:`pack` gives ``state``: tensors in its order, each dtype's laid end to end from 0."""
    at: dict[str, int] = {}
    entries = []
    for name, value in state.items():
        array = np.asarray(value)
        dtype = array.dtype.name
        if dtype not in DTYPES:
            raise PackingError(f"tensor {name!r} has dtype {dtype}; a packed model holds {', '.join(sorted(DTYPES))}")
        entries.append(Entry(str(name), dtype, tuple(int(d) for d in array.shape), at.get(dtype, 0)))
        at[dtype] = at.get(dtype, 0) + array.size
    return tuple(entries)


def vector_key(dtype: str, layout: Sequence[Entry]) -> str:
    """The key of ``dtype``'s packed array in ``layout``: ``PACKED_PREFIX + dtype`` and the layout's digest."""
    return f"{PACKED_PREFIX}{dtype}@{hashlib.sha256(encode_layout(layout)).hexdigest()[:16]}"


def pack(state: Mapping[str, Any], layout: Sequence[Entry] | None = None) -> dict[str, np.ndarray]:
    """``state`` as one 1-D array per dtype (:func:`vector_key`), laid out as ``layout`` says.

    Args:
        state: the state dict (numpy arrays or CPU torch tensors).
        layout: how to lay it out (a site: the layout it received, so that its reply is laid out as the centre
            expects); None: :func:`layout_of` ``state``.

    Raises:
        PackingError: ``state`` does not hold exactly the tensors ``layout`` names, with their dtypes and shapes.
    """
    layout = layout_of(state) if layout is None else tuple(layout)
    names = {e.name for e in layout}
    if set(state) != names:
        missing, extra = sorted(names - set(state))[:3], sorted(set(state) - names)[:3]
        raise PackingError(f"the model does not hold the tensors of the layout (missing {missing}, extra {extra})")
    arrays = {}
    for dtype in dict.fromkeys(e.dtype for e in layout):  # first-seen order
        parts = []
        for entry in (e for e in layout if e.dtype == dtype):
            array = np.asarray(state[entry.name])
            if array.dtype.name != entry.dtype or tuple(array.shape) != entry.shape:
                raise PackingError(f"tensor {entry.name!r} is {array.dtype.name} {list(array.shape)}; the layout "
                                   f"says {entry.dtype} {list(entry.shape)}")
            parts.append(np.ravel(array))
        arrays[vector_key(dtype, layout)] = np.concatenate(parts)
    return arrays


def is_packed(arrays: Mapping[str, Any]) -> bool:
    """Whether a received ArrayRecord (or state dict) holds a packed model: ``PACKED_PREFIX + dtype`` keys only."""
    return bool(arrays) and all(str(key).startswith(PACKED_PREFIX) for key in arrays)


def unpack(arrays: Mapping[str, Any], layout: Sequence[Entry]) -> dict[str, np.ndarray]:
    """The state dict a packed model holds, tensors in the layout's order (views into the received arrays).

    Args:
        arrays: what was received: one array per dtype under :func:`vector_key` (numpy arrays or CPU torch
            tensors).
        layout: the layout they are in (the centre: the one it sent; a site: the one its instruction carried, as
            :func:`decode_layout` checked it).

    Raises:
        PackingError: the arrays are not exactly the ones the layout describes.
    """
    layout = tuple(layout)
    vectors = {key: _array(value, key) for key, value in arrays.items()}
    lengths = {e.dtype: 0 for e in layout}
    for e in layout:
        lengths[e.dtype] = max(lengths[e.dtype], e.offset + e.size)
    keys = {dtype: vector_key(dtype, layout) for dtype in lengths}
    if set(vectors) != set(keys.values()):
        raise PackingError(f"the packed arrays are {sorted(vectors)[:5]}, the layout describes "
                           f"{sorted(keys.values())} (the part after '@' names the layout they were packed in)")
    for dtype, length in lengths.items():
        vector = vectors[keys[dtype]]
        if vector.ndim != 1 or vector.dtype.name != dtype or vector.size != length:
            raise PackingError(f"packed array {keys[dtype]!r} is {vector.dtype.name} of shape {tuple(vector.shape)}; "
                               f"its layout says {dtype} of shape ({length},)")
    return {e.name: vectors[keys[e.dtype]][e.offset:e.offset + e.size].reshape(e.shape) for e in layout}


def encode_layout(layout: Sequence[Entry]) -> bytes:
    return json.dumps({"format": LAYOUT_FORMAT,
                       "tensors": [[e.name, e.dtype, list(e.shape), e.offset] for e in layout]},
                      separators=(",", ":")).encode("utf-8")


def decode_layout(raw: Any) -> Layout:
    """A received layout (bytes), checked: valid JSON of the expected form, distinct names, known dtypes, shapes of
    non-negative whole numbers, and each dtype's tensors laid end to end from offset 0 in order."""
    if not isinstance(raw, bytes):
        raise PackingError(f"the layout must be bytes, got {type(raw).__name__}")
    if len(raw) > MAX_LAYOUT_BYTES:
        raise PackingError(f"the layout is {len(raw)} bytes, over the {MAX_LAYOUT_BYTES} allowed")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackingError(f"the layout is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "tensors"} or doc["format"] != LAYOUT_FORMAT \
            or not isinstance(doc["tensors"], list):
        raise PackingError(f"the layout must be {{'format': {LAYOUT_FORMAT}, 'tensors': [...]}}")
    entries, seen, at = [], set(), {}
    for i, item in enumerate(doc["tensors"]):
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and isinstance(item[1], str)
                and isinstance(item[2], list) and _whole(item[3]) and len(item[2]) <= MAX_NDIM
                and all(_whole(d) for d in item[2])):
            raise PackingError(f"layout entry {i} must be [name, dtype, [dims...], offset] with whole numbers >= 0")
        name, dtype, shape, offset = item
        if dtype not in DTYPES:
            raise PackingError(f"layout entry {i} ({name!r}) has dtype {dtype!r}; allowed: {', '.join(sorted(DTYPES))}")
        if name in seen:
            raise PackingError(f"layout names tensor {name!r} twice")
        seen.add(name)
        entry = Entry(name, dtype, tuple(shape), offset)
        if offset != at.get(dtype, 0):
            raise PackingError(f"layout entry {i} ({name!r}) starts at {offset} in its {dtype} array; the tensors "
                               f"before it end at {at.get(dtype, 0)}")
        at[dtype] = offset + entry.size
        entries.append(entry)
    return tuple(entries)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _array(value: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PackingError(f"packed item {key!r} is not an array ({type(exc).__name__})") from None
