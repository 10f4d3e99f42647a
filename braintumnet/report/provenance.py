"""What produced a result: the run-config overrides, the code (package version, git commit) and the machine.

A number without these cannot be reproduced or compared: the same study on another commit, another torch or another
CPU count gives other figures (floating-point reductions differ with the thread count). ``bench`` keeps its own
machine description for its result files; the study's report and ``metrics.json`` use this one, which ships with the
package.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import braintumnet

UNKNOWN = "unknown"
# The checkout this package lives in, if it was installed from one in editable mode (else site-packages).
_SOURCE_ROOT = Path(braintumnet.__file__).resolve().parent.parent


def git_commit(root: Path | None = None) -> str:
    """The short commit of the checkout holding this package, with ``-dirty`` when tracked files differ from it.

    ``"unknown"`` when the package is not in a git checkout (an installed wheel), when git is missing or fails: a
    record of the code must never stop a run.
    """
    root = Path(root) if root is not None else _SOURCE_ROOT

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        # An installed package can sit inside some other repository (a virtual environment in a project folder):
        # only this package's own checkout counts.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return UNKNOWN
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return (head + ("-dirty" if dirty else "")) if head else UNKNOWN


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """CPU model, core count (all and usable by this process), GPU name (None without CUDA)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable_cores(), "gpu": gpu,
            "cuda": torch.version.cuda if gpu else None, "torch_threads": torch.get_num_threads()}


def provenance(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything above as one JSON-ready dict; ``overrides`` are the run-config values given on the command line."""
    import flwr
    import torch

    return {"overrides": dict(overrides or {}), "braintumnet": braintumnet.__version__, "commit": git_commit(),
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
            "machine": machine()}


def one_line(record: Mapping[str, Any]) -> str:
    """``provenance()`` as one sentence for a report."""
    m = record.get("machine", {})
    overrides = record.get("overrides") or {}
    given = ", ".join(f"{k}={_toml(v)}" for k, v in overrides.items()) if overrides else "none"
    gpu = f"GPU {m['gpu']} (CUDA {m.get('cuda')})" if m.get("gpu") else "no GPU"
    return (f"braintumnet {record.get('braintumnet', UNKNOWN)}, commit {record.get('commit', UNKNOWN)}; "
            f"Python {record.get('python', UNKNOWN)}, torch {record.get('torch', UNKNOWN)}, "
            f"flwr {record.get('flwr', UNKNOWN)}; {m.get('cpu', UNKNOWN)}, {m.get('cores_usable', '?')} usable of "
            f"{m.get('cores', '?')} cores, {gpu}. Run-config overrides (-c): {given}.")


def _toml(value: Any) -> str:
    """A value as it would be typed after ``-c key=`` (bare text is read as a string there)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
