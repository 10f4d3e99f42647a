"""Packages a hospital's site does not install, imported where they are used with one clear message when missing.

A site installs ``pip install .``: the ClientApp, the launcher and the data tools. The centre, the study and the
figures need more (``pip install '.[centre]'``, ``'.[simulation]'``, ``'.[figures]'``). They
are imported inside the functions that use them, never at module level on a site's path: MONAI's ``__init__`` imports
mlflow and matplotlib whenever they are installed, and Flower starts a fresh ClientApp process for every message, so
every package a site carries without using it costs each message its import time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

from braintumnet.errors import BrainTumNetError

# The extra that brings each optional package (pip's distribution names in pyproject.toml).
EXTRA_OF = {"matplotlib": "figures", "mlflow": "centre", "nilearn": "simulation", "ray": "simulation"}


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) or fail with a message naming the extra that installs it.

    Args:
        module: the dotted module name; its top-level package must be a key of :data:`EXTRA_OF`.
        purpose: what needs it, for the message ("the evaluation's figures").
        extra: the extra to name (default: the package's own, :data:`EXTRA_OF`).

    Raises:
        BrainTumNetError: the package is not installed, or is installed with one of its own modules missing.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing.partition(".")[0] != top:
            raise  # the package is there but something it imports is broken: show the real error
        if missing != top and _importable(top):
            # The package imports but one of its own modules is gone: a broken or half-finished install (pip
            # interrupted, or running beside this process), not a missing extra. Reinstall that one package only.
            raise BrainTumNetError(
                f"{purpose}: {top} is installed but its module {missing} cannot be found, so that install is broken "
                f"or unfinished; reinstall it with: pip install --force-reinstall --no-deps '{_pinned(top)}'") from None
        raise BrainTumNetError(
            f"{purpose}: {top} is not installed (a site's install carries only what a site runs); install it in the "
            f"BrainTumNet-FL folder with: pip install '.[{extra or EXTRA_OF[top]}]'") from None


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent that failed to import, or a module without a spec
        return False


def _pinned(distribution: str) -> str:
    """``name==version`` of the installed ``distribution``, or its bare name when its metadata are gone too.

    The import name stands for the distribution's name, as it does for every package of :data:`EXTRA_OF`."""
    try:
        return f"{distribution}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution
