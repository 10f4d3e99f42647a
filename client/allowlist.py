"""The site's FAB allow-list: which Flower apps this hospital lets run on its data.

Anyone who can submit a run to the SuperLink sends code (a FAB) that every SuperNode would install and execute. The
hospital's admin keeps a read-only file of the FABs they accept, one SHA-256 hash per line (``#`` starts a comment),
and names it as ``allowed-apps`` in the site config. The site executor (:mod:`client.executor`) checks the hash of a
task's FAB against the file before the FAB is installed or any of its code imported, and reads the file again for
every task, so adding a hash needs no restart.

``python client/run.py --fab-hash FILE.fab`` prints a FAB's hash (``flwr build`` writes the file); given the app's
folder instead, it prints the hash of the FAB ``flwr run FOLDER`` would upload (Flower builds it deterministically).

Nothing here imports ``flwr`` at module level.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from braintumnet.errors import BrainTumNetError

_HASH = re.compile(r"[0-9a-f]{64}")


class AppNotAllowed(BrainTumNetError):
    """A run's FAB is not on the site's allow-list."""


def read_allowlist(path: Path) -> set[str]:
    """The hashes listed in ``path``: one per line, blank lines and ``#`` comments ignored (also after a hash).

    Raises:
        BrainTumNetError: the file cannot be read, or a line is not a SHA-256 hash (the message names the line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BrainTumNetError(f"{path}: cannot read the allowed-apps file ({exc.strerror or exc}); it lists the "
                               "SHA-256 hashes of the Flower apps this site runs, one per line") from None
    hashes = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not _HASH.fullmatch(entry):
            raise BrainTumNetError(f"{path}:{number}: {entry[:80]!r} is not a SHA-256 FAB hash (64 hex digits); "
                                   "python client/run.py --fab-hash FILE.fab prints one")
        hashes.add(entry)
    return hashes


def check_allowed(fab_hash: str, path: Path | None) -> None:
    """Refuse ``fab_hash`` unless the allow-list at ``path`` lists it; ``path`` None = every app is allowed.

    Raises:
        AppNotAllowed: the hash is not listed; the message names the hash and the file to add it to.
        BrainTumNetError: the list cannot be read (an unreadable list allows nothing).
    """
    if path is None:
        return
    if fab_hash.lower() not in read_allowlist(path):
        raise AppNotAllowed(f"refused a run whose app (FAB sha256 {fab_hash}) is not on this site's allow-list "
                            f"{path}: if the hospital accepts this app, its admin adds that hash as a line of "
                            "the file (no restart needed)")


def fab_hash(path: Path) -> str:
    """The SHA-256 of a ``.fab`` file, or of the FAB that ``flwr run`` builds from an app folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise BrainTumNetError(f"{path}: no pyproject.toml; give a .fab file (flwr build writes one) or the "
                                   "app's folder")
        from flwr.cli.build import build_fab_from_disk

        try:
            content = build_fab_from_disk(path)
        except Exception as exc:  # noqa: BLE001 - Flower raises click/typer errors for an app it cannot build
            raise BrainTumNetError(f"{path}: flwr cannot build a FAB from this folder ({exc})") from None
    else:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise BrainTumNetError(f"{path}: cannot read the FAB ({exc.strerror or exc}); flwr build writes one "
                                   "in the app's folder") from None
    return hashlib.sha256(content).hexdigest()
