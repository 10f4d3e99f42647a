"""An optional package that is missing, or installed but broken, is named with the command that fixes it."""

from __future__ import annotations

import sys

import pytest

from braintumnet.errors import BrainTumNetError
from braintumnet.extras import require


def test_a_missing_extra_names_the_extra_that_installs_it(monkeypatch):
    # Other tests' imports (MONAI) may have loaded matplotlib already: forget it, then make its import fail as if it
    # were not installed (monkeypatch puts every entry back afterwards).
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    expected = r"the figures: matplotlib is not installed.*pip install '\.\[figures\]'"
    with pytest.raises(BrainTumNetError, match=expected):
        require("matplotlib.figure", "the figures")


def test_a_package_missing_one_of_its_own_modules_is_called_broken_not_absent(tmp_path, monkeypatch):
    (tmp_path / "halfpkg").mkdir()
    (tmp_path / "halfpkg" / "__init__.py").write_text("")  # imports, but its module 'figure' is gone
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(BrainTumNetError) as raised:
        require("halfpkg.figure", "the figures", extra="figures")
    message = str(raised.value)
    assert "halfpkg is installed but its module halfpkg.figure cannot be found" in message
    assert "not installed" not in message and "pip install --force-reinstall --no-deps 'halfpkg'" in message


def test_an_installed_package_names_its_version_in_the_reinstall_command():
    pytest.importorskip("matplotlib")
    from importlib.metadata import version

    with pytest.raises(BrainTumNetError, match=f"'matplotlib=={version('matplotlib')}'"):
        require("matplotlib.no_such_module_here", "the figures")


def test_a_broken_dependency_of_an_installed_package_shows_the_real_error(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import no_such_dependency_of_brokenpkg\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_brokenpkg"):
        require("brokenpkg", "the figures", extra="figures")
