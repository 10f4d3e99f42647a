"""A state dict as a few flat arrays and a layout, so a model travels as a handful of objects instead of hundreds.

Flower 1.42 sends a record as a tree of objects, one request per object (at most two at a time on a 2-core machine),
on each of a message's three hops each way (centre -> SuperLink -> SuperNode -> ClientApp). One array per tensor made
a model message ~300 objects: on a loaded 2-core loopback deployment a message there and back took ~26 s against ~9 s
packed (bench/results/transfer.md). Packed, the model is one 1-D array per dtype (tensors concatenated in the state
dict's order, so each keeps its dtype exactly: float32 weights and e.g. int64 counters travel apart) and a layout:
each tensor's name, dtype, shape and offset into its dtype's array, as UTF-8 JSON in a uint8 array. All of it sits in
the message's one ArrayRecord under the keys :data:`~braintumnet.protocol.PACKED_PREFIX` + dtype and
:data:`~braintumnet.protocol.PACKED_LAYOUT`, so the layout goes wherever the arrays go.

:func:`unpack` trusts nothing it receives: the layout must parse, describe distinct names with known numeric dtypes
and shapes laid end to end, and cover exactly the arrays that came with it; given the layout the receiver expects
(the one it sent), it must match that exactly. Anything else raises :class:`PackingError` with what is wrong.

Framework-free: numpy only (torch CPU tensors are accepted as inputs; the results are numpy arrays).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from braintumnet.errors import BrainTumNetError
from braintumnet.protocol import PACKED_LAYOUT, PACKED_PREFIX

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


def pack(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``state`` as one 1-D array per dtype (``PACKED_PREFIX + dtype``) and the layout (``PACKED_LAYOUT``, uint8)."""
    layout = layout_of(state)
    arrays = {}
    for dtype in dict.fromkeys(e.dtype for e in layout):  # first-seen order
        parts = [np.ravel(np.asarray(state[e.name])) for e in layout if e.dtype == dtype]
        arrays[PACKED_PREFIX + dtype] = np.concatenate(parts).astype(dtype, copy=False)
    arrays[PACKED_LAYOUT] = np.frombuffer(encode_layout(layout), dtype=np.uint8).copy()
    return arrays


def is_packed(arrays: Mapping[str, Any]) -> bool:
    """Whether a received ArrayRecord (or state dict) is a packed model."""
    return PACKED_LAYOUT in arrays


def unpack(arrays: Mapping[str, Any], expected: Layout | None = None) -> dict[str, np.ndarray]:
    """The state dict a packed model holds, tensors in the layout's order (views into the received arrays).

    Args:
        arrays: what was received: ``PACKED_PREFIX + dtype`` arrays and ``PACKED_LAYOUT`` (numpy arrays or CPU torch
            tensors).
        expected: the layout the receiver expects (e.g. the one it sent); None checks the layout's own consistency
            only (the receiver then checks names and shapes against its model).

    Raises:
        PackingError: the layout or the arrays are malformed, or do not match ``expected``.
    """
    if PACKED_LAYOUT not in arrays:
        raise PackingError(f"a packed model needs its layout array {PACKED_LAYOUT!r}; got keys {sorted(arrays)[:5]}")
    layout = decode_layout(_array(arrays[PACKED_LAYOUT], PACKED_LAYOUT))
    if expected is not None and layout != tuple(expected):
        raise PackingError(f"the packed model is not the one expected: {_first_difference(layout, tuple(expected))}")
    vectors = {key: _array(value, key) for key, value in arrays.items() if key != PACKED_LAYOUT}
    needed = {PACKED_PREFIX + e.dtype: 0 for e in layout}
    for e in layout:
        needed[PACKED_PREFIX + e.dtype] = max(needed[PACKED_PREFIX + e.dtype], e.offset + e.size)
    if set(vectors) != set(needed):
        raise PackingError(f"the packed arrays are {sorted(vectors)}, the layout describes {sorted(needed)}")
    for key, length in needed.items():
        vector = vectors[key]
        dtype = key[len(PACKED_PREFIX):]
        if vector.ndim != 1 or vector.dtype.name != dtype or vector.size != length:
            raise PackingError(f"packed array {key!r} is {vector.dtype.name} of shape {tuple(vector.shape)}; its "
                               f"layout says {dtype} of shape ({length},)")
    return {e.name: vectors[PACKED_PREFIX + e.dtype][e.offset:e.offset + e.size].reshape(e.shape) for e in layout}


def encode_layout(layout: Sequence[Entry]) -> bytes:
    return json.dumps({"format": LAYOUT_FORMAT,
                       "tensors": [[e.name, e.dtype, list(e.shape), e.offset] for e in layout]},
                      separators=(",", ":")).encode("utf-8")


def decode_layout(raw: np.ndarray) -> Layout:
    """A received layout array, checked: valid JSON of the expected form, distinct names, known dtypes, shapes of
    non-negative whole numbers, and each dtype's tensors laid end to end from offset 0 in order."""
    if raw.ndim != 1 or raw.dtype != np.uint8:
        raise PackingError(f"the layout must be a 1-D uint8 array, got {raw.dtype.name} of shape {tuple(raw.shape)}")
    if raw.size > MAX_LAYOUT_BYTES:
        raise PackingError(f"the layout is {raw.size} bytes, over the {MAX_LAYOUT_BYTES} allowed")
    try:
        doc = json.loads(raw.tobytes().decode("utf-8"))
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


def _first_difference(got: Layout, want: Layout) -> str:
    if len(got) != len(want):
        return f"it holds {len(got)} tensors, {len(want)} expected"
    for g, w in zip(got, want):
        if g != w:
            return (f"tensor {g.name!r} {g.dtype} {list(g.shape)} at {g.offset} where {w.name!r} {w.dtype} "
                    f"{list(w.shape)} at {w.offset} was expected")
    return "its layout differs"
