"""Process helpers shared by the site launcher (client/site_processes.py) and the study's workers
(simulation/workers.py)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1  # Linux's prctl: the signal a process gets when its parent dies


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process ``signum`` when its parent dies, however it dies (even by SIGKILL).
    False where that cannot be asked (not Linux): the caller then relies on its parent stopping it."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        return False
    return True
