"""A hospital's install (``pip install .``, no extras) runs the ClientApp and carries nothing the site does not use.

Flower starts a fresh ClientApp process for every message, and MONAI's ``__init__`` imports mlflow and matplotlib
whenever they are installed, so a package in the base dependencies that only the centre or the study needs costs
every message its import time. The subprocess below sees only the distributions that the base dependencies of
``pyproject.toml`` pull in (everything else installed here for the tests is hidden from its importer and from
``importlib.metadata``), as a site's own virtual environment would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = "braintumnet-fl"
# What only the centre, the study or the figures need; a site must neither install nor import them.
NOT_AT_A_SITE = ("mlflow", "matplotlib", "nilearn", "ray")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _closure(requirements: list[str]) -> set[str]:
    """The canonical names of every installed distribution ``requirements`` pull in (markers and extras applied)."""
    names = {canonicalize_name(PROJECT)}
    expanded: set[tuple[str, tuple[str, ...]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), tuple(sorted(req.extras))
        if (name, extras) in expanded:
            continue
        expanded.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # a platform-only dependency absent here: nothing to keep or hide
        names.add(name)
        for sub in map(Requirement, dist.requires or []):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *extras)):
                sub.marker = None
                todo.append(sub)
    return names


def _site_modules() -> tuple[set[str], set[str]]:
    """(distributions a site installs, top-level modules installed here that a site would not have)."""
    site = _closure(_pyproject()["project"]["dependencies"])
    hidden = {module for module, dists in packages_distributions().items()
              if not any(canonicalize_name(d) in site for d in dists)}
    return site, hidden


# Runs in the subprocess: swaps the path finder for one that cannot see the hidden packages, then imports what a
# site imports. Prints a JSON line for the test.
SITE_PROCESS = r"""
import json, sys
from importlib.machinery import PathFinder
from packaging.utils import canonicalize_name

SITE, HIDDEN = set(json.loads(sys.argv[1])), set(json.loads(sys.argv[2]))

class SiteInstall:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (d for d in PathFinder.find_distributions(*args, **kwargs)
                if canonicalize_name(d.metadata["Name"] or "") in SITE)

    invalidate_caches = PathFinder.invalidate_caches

sys.meta_path[sys.meta_path.index(PathFinder)] = SiteInstall
import client.app  # noqa: E402
clientapp = sorted({m.partition(".")[0] for m in sys.modules} & {"mlflow", "matplotlib", "nilearn", "ray"})
import braintumnet.cli, braintumnet.evaluate, braintumnet.predict, client.run  # noqa: E402,F401  the site's tools
from braintumnet.errors import BrainTumNetError  # noqa: E402
from braintumnet.report.plots import new_figure  # noqa: E402
try:
    new_figure()
    figure = "drawn"
except BrainTumNetError as exc:
    figure = str(exc)
print(json.dumps({"clientapp": clientapp, "figure": figure}))
"""


def test_clientapp_imports_in_a_site_install_without_the_centre_or_study_packages():
    site, hidden = _site_modules()
    assert {"mlflow", "matplotlib"} <= hidden | set(NOT_AT_A_SITE)
    done = subprocess.run([sys.executable, "-c", SITE_PROCESS, json.dumps(sorted(site)), json.dumps(sorted(hidden))],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["clientapp"] == [], f"the ClientApp's import chain loads {result['clientapp']}"
    # A site that asks for a figure learns which extra draws it, instead of a traceback.
    assert "matplotlib" in result["figure"] and "pip install '.[figures]'" in result["figure"]


def test_site_install_is_lean_and_the_test_extra_installs_everything():
    """``pip install .`` (a site) leaves the centre's and the study's packages out; the README's
    ``pip install -e ".[test]"`` (and CI) still installs every extra."""
    site, _ = _site_modules()
    assert not site & set(NOT_AT_A_SITE), "pip install . (a site) would install these: move them to an extra"
    assert {"torch", "monai", "flwr", "opacus", "nibabel", "pydicom"} <= site
    extras = _pyproject()["project"]["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in map(Requirement, requirements):
            if canonicalize_name(req.name) == PROJECT:  # the project's own extras, as "braintumnet-fl[centre]"
                out |= set().union(*(names(extras[e]) for e in req.extras))
            else:
                out.add(canonicalize_name(req.name))
        return out

    test = names(extras["test"])
    missing = {extra: sorted(names(reqs) - test) for extra, reqs in extras.items() if names(reqs) - test}
    assert not missing, f"pip install -e '.[test]' leaves out {missing}"
