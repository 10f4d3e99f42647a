"""The command line: summaries on success, one clear line and a non-zero exit (never a traceback) on a mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from braintumnet.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "braintumnet.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_check_and_prepare_print_a_summary(phantom_root, tmp_path, capsys):
    assert main(["check", str(phantom_root / "yibin")]) == 0
    assert "yibin" in capsys.readouterr().out
    code = main(["prepare", str(phantom_root / "plagh"), "--cache", str(tmp_path), "--img-size", "32",
                 "--slices-per-case", "2"])
    assert code == 0
    assert "plagh" in capsys.readouterr().out


@pytest.mark.parametrize("args, phrase", [
    (["check", "/no/such/site"], "/no/such/site"),
    (["init", "/no/such/site"], "/no/such/site: no such site folder"),
    (["train", "--data", "/no/such/site", "--out", "/tmp/x"], "/no/such/site"),
    (["evaluate", "--model", "/no/such/model.pt", "--data", "/tmp", "--out", "/tmp/x"], "model.pt"),
    (["prepare", "/tmp", "--img-size", "50"], "img_size=50"),
])
def test_user_mistakes_exit_non_zero_with_one_message(args, phrase):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert phrase in result.stderr
    assert "Traceback" not in result.stderr


def test_centralized_train_command(phantom_root, tmp_path, capsys):
    sites = ",".join(str(phantom_root / s) for s in ("yibin", "plagh", "jinling"))
    code = main(["train", "--data", sites, "--external", str(phantom_root / "external"), "--out",
                 str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--img-size", "32",
                 "--slices-per-case", "2", "--epochs", "1", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "dice_tumor" in out and (tmp_path / "run" / "model.pt").is_file()


def test_version_verbose_after_the_command_and_a_help_text_for_every_option(capsys):
    import argparse

    import braintumnet
    from braintumnet.cli import build_parser, main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"braintumnet {braintumnet.__version__}"
    parser = build_parser()
    assert parser.parse_args(["check", "-v", "x"]).verbose and parser.parse_args(["-v", "check", "x"]).verbose
    assert not hasattr(parser.parse_args(["check", "x"]), "verbose") or not parser.parse_args(["check", "x"]).verbose
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {action.option_strings or action.dest}" for name, sub in commands.items()
               for action in sub._actions if not action.help and not isinstance(action, argparse._HelpAction)]
    assert not missing, missing
    profile = next(a for a in commands["train"]._actions if "--profile" in a.option_strings)
    assert set(profile.choices) == {"quick", "standard", "paper"}
