"""The rayseg console script: every subcommand exists, and each --help explains itself."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest

from jobs.cli import SUBCOMMANDS, build_parser, main


def test_all_subcommands_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)
    assert set(SUBCOMMANDS) == {"demo", "validate", "plan", "pack", "train", "tune", "auto",
                                "runs", "predict", "export-masks", "tune-postprocess", "rank",
                                "explain", "evaluate",
                                "promote", "serve", "monitor", "bench"}


def test_mask_export_formats_parse_into_their_configs(tmp_path, capsys):
    """`export-masks` and `predict --format` map onto ExportMasksConfig / PredictConfig.format;
    an unknown format is refused by the parser, and by the config from --set."""
    from jobs.options import job_config
    from pipelines.config import ExportMasksConfig, PredictConfig

    args = build_parser().parse_args(["export-masks", "s3://b/preds", "--out", "s3://b/coco"])
    cfg = job_config(ExportMasksConfig, args, {"predictions": args.predictions, "out": args.out,
                                               "format": args.format})
    assert (cfg.predictions, cfg.out, cfg.format) == ("s3://b/preds", "s3://b/coco", "coco-rle")
    args = build_parser().parse_args(["predict", "--model", "m", "--input", "i", "--out", "o",
                                      "--format", "coco-rle"])
    assert job_config(PredictConfig, args, {"model": "m", "input": "i", "out": "o",
                                            "format": args.format}).format == "coco-rle"
    assert job_config(PredictConfig, build_parser().parse_args(
        ["predict"]), {"model": "m", "input": "i", "out": "o"}).format == "parquet"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export-masks", "p", "--out", "o", "--format", "png"])
    assert "invalid choice: 'png'" in capsys.readouterr().err
    assert main(["export-masks", "p", "--out", str(tmp_path), "--set", "format=png"]) == 2
    assert "format: expected one of ['coco-rle'], got 'png'" in capsys.readouterr().err


def test_auto_takes_shared_training_keys_and_refuses_data_and_schedule(tmp_path, capsys):
    from jobs.auto import shared_settings

    base = ["auto", "--manifest", str(tmp_path / "m.csv"), "--max-runtime-secs", "60"]
    yaml_file = tmp_path / "auto.yaml"
    yaml_file.write_text("loss: focal\naugment:\n  rot90: false\n")
    args = build_parser().parse_args(base + ["--config", str(yaml_file), "--set",
                                             "optim.lr=0.003", "--set", "augment.rot90=true"])
    assert shared_settings(args) == {"loss": "focal", "augment.rot90": True, "optim.lr": 0.003}
    # refused before Ray starts or the manifest is read (it does not exist)
    assert main(base + ["--set", "epochs=3", "--set", "data.manifest=x.csv"]) == 2
    err = capsys.readouterr().err
    assert "data, epochs cannot come from --config/--set" in err and "drop them" in err
    assert main(base + ["--nfolds", "1"]) == 2 and main(base + ["--max-models", "5"]) == 2
    err = capsys.readouterr().err
    assert "nfolds must be 0" in err and "got 1" in err and "max_models" in err


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

    assert main([]) == 2
    assert "usage: rayseg" in capsys.readouterr().out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_command_takes_config_and_set(name, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    text = capsys.readouterr().out
    assert "--config YAML" in text and "--set KEY=VALUE" in text


def test_config_then_flags_then_set_and_typos_list_the_valid_keys(tmp_path, capsys):
    import argparse

    from jobs.options import job_config, resolve_config_path
    from pipelines.config import PredictConfig

    yaml_file = tmp_path / "predict.yaml"
    yaml_file.write_text("model: s3://b/m\ninput: s3://b/i\nout: o\nbatch_size: 4\nactors: 3\n")
    args = argparse.Namespace(config=str(yaml_file), overrides=["actors=5", "tta=true"])
    cfg = job_config(PredictConfig, args, {"out": "s3://b/flag-out", "batch_size": None})
    assert (cfg.model, cfg.out, cfg.batch_size, cfg.actors, cfg.tta) == (
        "s3://b/m", "s3://b/flag-out", 4, 5, True)
    relative = job_config(PredictConfig, argparse.Namespace(config=str(yaml_file), overrides=[]))
    assert relative.out == str(Path("o").resolve())   # no relative path leaves the driver
    args.overrides = ["batch_sise=8"]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batch_sise'\].*'batch_size'"):
        job_config(PredictConfig, args)
    args.overrides = ["batch_size=many"]
    with pytest.raises(ValueError, match="batch_size: expected int, got 'many'"):
        job_config(PredictConfig, args)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['model', 'input', 'out'\]"):
        job_config(PredictConfig, argparse.Namespace(config=None, overrides=[]))
    # on the command line, a bad setting is one line naming the key, exit 2, no traceback

    assert main(["train", "--config", "train_sample", "--set", "fail_at_step=3"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("rayseg train: TrainConfig: unknown key(s) ['fail_at_step']")
    assert "Traceback" not in said and len(said.splitlines()) == 1
    # the shipped configs resolve by name and by their repository path, from any directory
    assert resolve_config_path("serve").name == "serve.yaml"
    assert resolve_config_path("/nowhere/jobs/configs/train_sample.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="train_isbi"):
        resolve_config_path("trian_sample")
