"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then renamed over the
target, so a crash (or a reader at the wrong moment) never sees half a checkpoint, ledger or ``metrics.json``.

JSON is written strict: NaN and infinities (an undefined AUC, a metric of nothing) become ``null``, numpy scalars
and arrays plain numbers and lists, paths strings. Every JSON document of the project is written by
:func:`atomic_write_json`, so they all follow that one rule.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

#: Owner-only permissions: what model weights, optimizer states and privacy ledgers are written with.
PRIVATE = 0o600


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, mode: int | None = None) -> Path:
    """Write ``path`` atomically: ``write`` fills a binary file object, which replaces ``path`` once complete.

    Args:
        path: the target; its folder is created.
        write: called once with the open temporary file (e.g. ``lambda f: torch.save(state, f)``).
        mode: the file's permission bits (e.g. ``0o600`` for a private key); the temporary file is created readable
            by its owner only, so the content is never more widely readable than ``mode`` allows, even briefly.
            None = what ``open`` gives a new file: ``0o666`` less the umask.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), mode=mode)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, document: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None,
                      mode: int | None = None) -> Path:
    """Write ``document`` as strict JSON (:func:`plain`: NaN and infinities as ``null``), atomically, with a final
    newline. ``default`` turns objects that :func:`plain` leaves alone into JSON values (as ``json.dump``'s)."""
    text = json.dumps(plain(document), indent=indent, allow_nan=False, default=default)
    return atomic_write_text(path, text + "\n", mode=mode)


def plain(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN and infinities -> None; numpy (and torch) scalars and numpy arrays ->
    Python numbers and lists; tuples -> lists; mapping keys -> strings; paths -> strings. Anything else is returned
    as it is."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # a numpy (or torch) scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _read_umask() -> int:
    """The process's umask. Reading it means setting it, so it is read once, on import, not while other threads may
    be creating files."""
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()
