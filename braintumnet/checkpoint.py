"""Self-describing model files: weights, the typed config and the class names travel together."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from braintumnet.config import Profile, from_dict, to_dict
from braintumnet.errors import BrainTumNetError

FORMAT = "braintumnet-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    profile: Profile
    class_names: tuple[str, ...]
    meta: dict[str, Any]


def save_checkpoint(
    path: Path, model_state: Mapping[str, torch.Tensor], profile: Profile, class_names, meta: Mapping | None = None
) -> Path:
    """Write atomically (temp file in the same folder, then rename), so a crash never leaves half a model."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model_state.items()},
        "config": to_dict(profile),
        "class_names": list(class_names),
        "meta": dict(meta or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a model file written by ``save_checkpoint``.

    Raises:
        BrainTumNetError: the file is missing, corrupt, or not a BrainTumNet checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise BrainTumNetError(f"{path}: no such checkpoint file; give the path of a model .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise BrainTumNetError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}); the file is "
                               "corrupt or truncated: copy it again or use another round's checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BrainTumNetError(f"{path}: not a BrainTumNet checkpoint (no '{FORMAT}' marker); "
                               "use a file written by braintumnet train or the federation server")
    try:
        profile = from_dict(payload["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BrainTumNetError(f"{path}: its config is not understood by this version ({exc})") from None
    return Checkpoint(payload["state_dict"], profile, tuple(payload["class_names"]), dict(payload["meta"]))
