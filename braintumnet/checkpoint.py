"""Self-describing model files: weights, the typed config and the class names travel together.

:func:`load_model` is the one way from such a file (or from weights and a profile, :func:`model_with_weights`) to
a BrainTumNet ready to run: it checks that the weights fit the model the config describes, and names the cause when
they do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from braintumnet.config import Profile, from_dict, to_dict
from braintumnet.engine import build_model
from braintumnet.errors import BrainTumNetError
from braintumnet.io import PRIVATE, atomic_write
from braintumnet.labels import TASKS
from braintumnet.model import BrainTumNet

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
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model_state.items()},
        "config": to_dict(profile),
        "class_names": list(class_names),
        "meta": dict(meta or {}),
    }
    return atomic_write(path, lambda f: torch.save(payload, f), mode=PRIVATE)


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


def task_of(class_names: Sequence[str]) -> str | None:
    """The task (``3class`` / ``binary``) whose classes are ``class_names``, in order; None if none is."""
    return next((task for task, names in TASKS.items() if tuple(names) == tuple(class_names)), None)


def load_model(model_path: Path, device: torch.device | str = "cpu", *,
               task: str | None = None) -> tuple[BrainTumNet, Checkpoint]:
    """A checkpoint's BrainTumNet, weights loaded, in eval mode on ``device``.

    Args:
        model_path: a file written by ``save_checkpoint``.
        device: where the model runs.
        task: the task the caller expects (``3class`` or ``binary``); None accepts the checkpoint's own.

    Raises:
        BrainTumNetError: missing, corrupt or non-BrainTumNet file; a checkpoint of another task than ``task``;
            weights that do not fit the model its config describes (naming the two tasks when that is the cause).
    """
    ckpt = load_checkpoint(model_path)
    names = ckpt.class_names
    own_task = task_of(names)
    if task is not None and task not in TASKS:
        raise BrainTumNetError(f"task {task!r} is not known: use one of {sorted(TASKS)}")
    if task is not None and own_task != task:
        raise BrainTumNetError(
            f"{model_path}: this checkpoint was trained for the {own_task or 'unknown'} task "
            f"({len(names)} classes: {', '.join(names)}), not {task} ({', '.join(TASKS[task])}); "
            f"use a {task} model, or leave the task out to use this one")
    model = model_with_weights(ckpt.profile, ckpt.state_dict, names, source=str(model_path))
    return model.to(device).eval(), ckpt


def model_with_weights(profile: Profile, state_dict: Mapping[str, torch.Tensor], class_names: Sequence[str], *,
                       source: str = "the weights") -> BrainTumNet:
    """``engine.build_model(profile, len(class_names))`` with ``state_dict`` loaded, after checking that every
    tensor is there with the shape the model expects (``load_state_dict`` alone gives a wall of text).

    Args:
        source: what the weights came from, for the message (a file name, "the federation's global model").

    Raises:
        BrainTumNetError: the weights do not fit; where they fit another task's model, the message says so.
    """
    model = build_model(profile, len(class_names))
    mismatch = _shape_mismatch(model.state_dict(), state_dict)
    if mismatch:
        fits = [t for t, classes in TASKS.items() if not _shape_mismatch(
            build_model(profile, len(classes)).state_dict(), state_dict)]
        if fits:
            raise BrainTumNetError(
                f"{source}: the weights are for the {fits[0]} task ({', '.join(TASKS[fits[0]])}) but the "
                f"checkpoint names the classes of {_task_words(task_of(class_names))} ({', '.join(class_names)}); "
                "the file mixes two models: use a checkpoint written as a whole by braintumnet train or the "
                "federation server")
        raise BrainTumNetError(
            f"{source}: its weights do not fit the model its config describes ({mismatch}); it was written "
            "by another version of BrainTumNet or edited: use a checkpoint written by this version")
    model.load_state_dict(state_dict)
    return model


def _task_words(task: str | None) -> str:
    return f"the {task} task" if task else "no known task"


def _shape_mismatch(expected: Mapping, given: Mapping) -> str | None:
    """None if ``given`` has exactly ``expected``'s keys and shapes, else the first difference, in words."""
    missing = [k for k in expected if k not in given]
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    extra = [k for k in given if k not in expected]
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            return f"{key} is {tuple(given[key].shape)}, expected {tuple(tensor.shape)}"
    return None
