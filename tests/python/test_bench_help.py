"""Every `moelora bench` subcommand this package owns explains itself: `--help` prints a
description and every flag with its default; the e2e matrix prints the commands it would run."""

from __future__ import annotations

import argparse
import importlib

import pytest
from moelora.cli import main

COMMANDS = {
    "offline": "moelora.bench.offline",
    "scale": "moelora.bench.scale",
    "serve": "moelora.bench.serve",
    "latency": "moelora.bench.latency",
    "adapters": "moelora.bench.adapters",
    "e2e-matrix": "moelora.bench.matrix",
    "serve-synthetic": "moelora.bench.serve_synthetic",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_a_description_and_every_default(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    module = importlib.import_module(COMMANDS[command])
    first_line = module.__doc__.strip().splitlines()[0]
    assert first_line in " ".join(text.split()), first_line
    parser = module.add_cli_args(argparse.ArgumentParser())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
    assert text.count("(default:") >= len(parser._actions) - 1


def test_e2e_matrix_dry_run_prints_the_model_commands(capsys):
    assert main(["bench", "e2e-matrix", "--dry-run", "--out", "x/e2e.jsonl"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+")]
    assert len(lines) == 2
    gpt_oss, qwen3 = lines
    assert "--model synthetic:gpt-oss-20b --weights mxfp4 --num-layers 24" in gpt_oss
    assert "--model synthetic:qwen3-30b-a3b --weights bf16 --num-layers 48,24" in qwen3
    for line in lines:
        assert "--num-seqs 1 16 64" in line and "--num-adapters 0 1 16" in line
        assert "--rank 16" in line and "--out x/e2e.jsonl" in line
