"""Atomic writes and the one JSON rule: a file is whole or absent, NaN is written as null (strict JSON)."""

from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest

from braintumnet.io import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, plain


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")

    def half(f):
        f.write(b"new, but")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_mode_is_applied_and_the_default_is_what_open_gives(tmp_path):
    secret = atomic_write_bytes(tmp_path / "key", b"k", mode=0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    plain_file = tmp_path / "plain"
    plain_file.write_text("x")
    assert stat.S_IMODE(atomic_write_text(tmp_path / "ours", "x").stat().st_mode) == \
        stat.S_IMODE(plain_file.stat().st_mode)


def test_json_is_strict_nan_and_infinity_become_null_numpy_becomes_numbers(tmp_path):
    doc = {"auc": float("nan"), "hd": math.inf, "n": np.int64(3), "dice": np.float32(0.5),
           "cm": np.array([[1, 0], [0, 1]]), "path": tmp_path, 1: (True, np.bool_(False))}
    path = atomic_write_json(tmp_path / "metrics.json", doc)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("}\n")
    assert json.loads(text) == {"auc": None, "hd": None, "n": 3, "dice": 0.5, "cm": [[1, 0], [0, 1]],
                                "path": str(tmp_path), "1": [True, False]}
    assert plain(doc)["auc"] is None and doc["auc"] != doc["auc"]  # the caller's dict is left as it was


def test_json_refuses_what_it_cannot_write_unless_given_a_default(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": object()})
    assert not (tmp_path / "a.json").exists()
    atomic_write_json(tmp_path / "a.json", {"x": {1, 2}}, default=sorted)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
