"""The rayseg console script: every subcommand exists, and each --help explains itself."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import SUBCOMMANDS, build_parser


def test_all_subcommands_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)
    assert set(SUBCOMMANDS) == {"demo", "validate", "pack", "train", "predict", "evaluate", "serve", "bench"}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_explains_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"rayseg {name}" in text, "usage line names the command"
    assert len(text.split()) > 40, f"`rayseg {name} --help` is too terse to explain anything"
    assert "example" in text.lower(), f"`rayseg {name} --help` should show an example"


def test_console_script_imports_cheaply():
    """`rayseg --help` must not start Ray or import torch (it should answer instantly)."""
    code = ("import sys; from jobs.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_command_prints_help_and_fails(capsys):
    from jobs.cli import main

    assert main([]) == 2
    assert "usage: rayseg" in capsys.readouterr().out
