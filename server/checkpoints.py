"""The centre's run folder: a checkpoint every round, ``latest`` / ``best`` / ``final``, ``metrics.json``; resume.

Layout (absolute paths: a ServerApp runs in the SuperLink's working directory)::

    CHECKPOINT_DIR/
        mlflow.db, mlartifacts/        the embedded MLflow store (unless MLFLOW_TRACKING_URI is set)
        run-<flower run id>/
            round-0001.pt ...          the global model after each round (braintumnet.checkpoint format)
            round-0001.server-optimizer.npz ...
                                       with strategy.server-optimizer != none: the server optimizer's state after
                                       that round (model-shaped moment arrays only), restored by resume-from
            latest.pt, best.pt         hard links to the newest and the best round (best = federated dice_tumor)
            final.pt                   the model when the run finished
            metrics.json               per round: aggregated train / evaluate, per-site, external, timings, bytes,
                                       rejected replies, the sites' cumulative privacy ε
            audit.jsonl                with audit-messages = true: one line per message sent or received (what
                                       records, keys, shapes; never array contents)

Every file is written to a temporary name and renamed, so a crash leaves the previous version intact. A checkpoint's
``meta`` records the global round, so ``resume-from`` continues the numbering; the server optimizer's state of that
round is found beside it by the round number (``latest.pt`` is a link, so its own name says nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from braintumnet.errors import BrainTumNetError
from braintumnet.io import PRIVATE, atomic_write, atomic_write_json, plain

# Entries of a server-optimizer state file that are not state arrays (those are named "<attribute>/<model key>").
OPTIMIZER_KEY, ROUND_KEY = "optimizer", "round"


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: the checkpoint file, its global round and its meta."""

    path: Path
    round: int
    meta: dict[str, Any]


class RunFolder:
    """``CHECKPOINT_DIR/run-<run id>``: the files of one Flower run."""

    def __init__(self, root: Path, run_id: int):
        self.root = Path(root).absolute()
        self.dir = self.root / f"run-{run_id}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def round_path(self, server_round: int) -> Path:
        return self.dir / f"round-{server_round:04d}.pt"

    def save_round(self, server_round: int, state: Mapping, profile, class_names, meta: dict, best: bool) -> Path:
        """Write ``round-NNNN.pt`` and point ``latest`` (and ``best`` if ``best``) at it."""
        from braintumnet.checkpoint import save_checkpoint

        path = save_checkpoint(self.round_path(server_round), state, profile, class_names, meta)
        _link_atomically(path, self.dir / "latest.pt")
        if best:
            _link_atomically(path, self.dir / "best.pt")
        return path

    def save_server_optimizer(self, server_round: int, optimizer: str, state: Mapping[str, np.ndarray]) -> Path:
        """Write the server optimizer's state after ``server_round`` beside that round's checkpoint."""
        path = server_optimizer_path(self.dir, server_round)
        header = {OPTIMIZER_KEY: np.array(optimizer), ROUND_KEY: np.array(server_round)}
        return atomic_write(path, lambda f: np.savez(f, **header, **state), mode=PRIVATE)

    def save_final(self, state: Mapping, profile, class_names, meta: dict) -> Path:
        from braintumnet.checkpoint import save_checkpoint

        return save_checkpoint(self.dir / "final.pt", state, profile, class_names, meta)

    def write_metrics(self, document: dict) -> Path:
        return atomic_write_json(self.dir / "metrics.json", document)

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.jsonl"

    def append_audit(self, entries: list[dict]) -> None:
        """Append one JSON line per message description (appends: a crash loses at most the current exchange)."""
        with open(self.audit_path, "a", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(plain(entry), sort_keys=True, allow_nan=False) + "\n")


def find_resume_point(root: Path, spec: str) -> ResumePoint | None:
    """The checkpoint ``resume-from`` names: "" none; "latest" the newest ``latest.pt`` under ``root`` (all of one
    federation); a run folder (its ``latest.pt``); or a checkpoint file.

    Raises:
        BrainTumNetError: nothing to resume from, "latest" among checkpoints of several federations, or the file is
            not a checkpoint of this federation.
    """
    spec = spec.strip()
    if not spec:
        return None
    if spec == "latest":
        candidates = [p for p in Path(root).glob("run-*/latest.pt") if p.is_file()]
        if not candidates:
            raise BrainTumNetError(f"resume-from=latest: no run-*/latest.pt under {root}; check checkpoint-dir, "
                                   "or start without resume-from")
        _refuse_several_federations(root, candidates)
        path = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute():
            path = Path(root) / path
        if path.is_dir():
            path = path / "latest.pt"
    from braintumnet.checkpoint import load_checkpoint

    meta = load_checkpoint(path).meta  # raises BrainTumNetError naming the file if it is not a checkpoint
    if "round" not in meta:
        raise BrainTumNetError(f"{path}: has no federated round in its meta (not written by the ServerApp); "
                               "use a run-*/round-NNNN.pt or latest.pt")
    return ResumePoint(path.resolve(), int(meta["round"]), meta)


def _refuse_several_federations(root: Path, candidates: list[Path]) -> None:
    """``latest`` is only unambiguous within one federation: the newest file of another would carry its
    federation id, and with it the sites' privacy ledgers and optimizer state, onto the wrong federation.

    Raises:
        BrainTumNetError: the run folders hold checkpoints of more than one federation (or one whose federation
            cannot be read), listing them and how to name one.
    """
    federations: dict[str, list[str]] = {}
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime):
        meta = _meta_only(path)
        federation = str(meta.get("federation-id") or f"unknown ({path.parent.name}: no federation id in its meta)")
        rounds = f"round {meta['round']}" if "round" in meta else "no round"
        federations.setdefault(federation, []).append(f"{path.parent.name} ({rounds})")
    if len(federations) > 1:
        listing = "; ".join(f"federation {fid}: {', '.join(runs)}" for fid, runs in federations.items())
        newest = max(candidates, key=lambda p: p.stat().st_mtime).parent.name
        raise BrainTumNetError(
            f"resume-from=latest: {root} holds checkpoints of {len(federations)} federations ({listing}), so the "
            f"newest file need not be the federation meant; name the one to resume, e.g. resume-from='{newest}' "
            "(a run folder under checkpoint-dir) or the path of its latest.pt, or give each federation its own "
            "checkpoint-dir")


def _meta_only(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta`` without reading its weights (memory-mapped); {} if it cannot be read."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a damaged file: its federation is unknown
        return {}
    meta = payload.get("meta") if isinstance(payload, dict) else None
    return meta if isinstance(meta, dict) else {}


def server_optimizer_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / f"round-{server_round:04d}.server-optimizer.npz"


def load_server_optimizer(point: ResumePoint, optimizer: str) -> dict[str, np.ndarray]:
    """The server optimizer's state saved with the round ``point`` resumes (in the checkpoint's folder).

    Raises:
        BrainTumNetError: the file is missing, unreadable, or holds another optimizer's or round's state.
    """
    path = server_optimizer_path(point.path.parent, point.round)
    fix = (f"put the run folder's {path.name} beside {point.path.name}, or start without resume-from (the server "
           "optimizer's moments would start again from zero)")
    if not path.is_file():
        raise BrainTumNetError(f"{path}: missing; resuming round {point.round} with strategy.server-optimizer="
                               f"{optimizer} needs the server optimizer's state of that round: {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BrainTumNetError(f"{path}: not a server-optimizer state file ({exc}): {fix}") from None
    name, saved_round = str(saved.pop(OPTIMIZER_KEY, "")), int(saved.pop(ROUND_KEY, -1))
    if name != optimizer or saved_round != point.round:
        raise BrainTumNetError(f"{path}: holds {name or 'no'} state of round {saved_round}, expected {optimizer} "
                               f"of round {point.round}: {fix}")
    return saved


def _link_atomically(target: Path, link: Path) -> None:
    """``link`` becomes another name of ``target`` (a hard link; a copy where links are not allowed), atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        import shutil

        shutil.copy2(target, tmp)
    os.replace(tmp, link)
