"""Config: TOML + `--section.key=value` overrides; bad input fails at start with one line."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpointing
from elastic_train import config as cfg
from elastic_train.model import GPT, config_for
from elastic_train.spec import names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).parents[1] / "elastic_train" / "configs"


def test_command_line_beats_file_beats_defaults(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 50\n[checkpoint]\nevery = 7\nmode = "sync"\n')
    c = cfg.load(str(toml), cfg.parse_overrides(["--steps=60", "--optim.lr", "0.01"]))
    assert (c.steps, c.checkpoint.every, c.checkpoint.mode, c.optim.lr) == (60, 7, "sync", 0.01)
    assert c.seed == cfg.Config().seed


def test_contract_keys_of_chaos_scenarios_are_accepted():
    c = cfg.load(None, {"model": "small", "steps": 9, "seed": 4, "checkpoint.every": 3})
    assert (c.model, c.steps, c.seed, c.checkpoint.every) == ("small", 9, 4, 3)


@pytest.mark.parametrize("toml", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_set_what_they_say_and_round_trip_on_the_command_line(toml: Path):
    text = toml.read_text()
    c = cfg.load(str(toml))
    loaded = cfg._flatten(c.to_dict())
    # Every key of the file took effect as written: none renamed, dropped or shadowed.
    written = cfg._flatten(tomllib.loads(text))
    assert {key: loaded[key] for key in written} == written
    assert c != cfg.Config()
    # The model is the size its first line promises (within a quarter), at the file's seq_len.
    promised = float(re.search(r"~(\d+)M parameters", text.splitlines()[0]).group(1)) * 1e6
    with torch.device("meta"):
        model = GPT(config_for(c.model, c.data.seq_len, vocab_size=256))
    assert 0.75 * promised <= sum(p.numel() for p in model.parameters()) <= 1.25 * promised
    # The same run can be given as command-line overrides (how SkyPilot passes TRAIN_ARGS).
    args = [f"--{key}={loaded[key]}" for key in cfg._all_keys()]
    assert cfg.load(None, cfg.parse_overrides(args)) == c


def test_a_bad_file_value_fixed_on_the_command_line_is_accepted(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("[checkpoint]\nkeep = 0\nevery = 4\n")
    with pytest.raises(cfg.ConfigError, match="checkpoint.keep=0 must be >= 1"):
        cfg.load(str(toml))
    c = cfg.load(str(toml), {"checkpoint.keep": "2"})
    assert (c.checkpoint.keep, c.checkpoint.every) == (2, 4)


def test_the_checkpoint_section_is_what_the_manager_takes():
    c = cfg.load(None, {"checkpoint.keep": "5", "checkpoint.mode": "sync",
                        "checkpoint.cache_dir": "/tmp/c"})
    assert isinstance(c.checkpoint, checkpointing.CheckpointConfig)
    assert (c.checkpoint.keep, c.checkpoint.mode, c.checkpoint.cache_dir) == (5, "sync", "/tmp/c")
    # The manager's speed-only settings keep its defaults and are not keys of the file.
    assert c.checkpoint.write_threads == checkpointing.CheckpointConfig().write_threads
    with pytest.raises(cfg.ConfigError, match="unknown config key 'checkpoint.write_threads'"):
        cfg.load(None, {"checkpoint.write_threads": "4"})


@pytest.mark.parametrize("overrides,message", [
    ({"checkpont.every": "5"},
     "unknown config key 'checkpont.every' (did you mean 'checkpoint.every'?)"),
    ({"model": "huge"}, "model='huge' is not a registered spec; expected one of "
                        f"{', '.join(names())} or package.module:NAME"),
    ({"data.micro_batch": "-1"}, "data.micro_batch=-1 must be >= 0 (0: no accumulation)"),
    ({"steps": "0"}, "steps=0 must be >= 1"),
    ({"steps": "ten"}, "steps='ten' is not a valid int"),
    ({"checkpoint.mode": "later"}, "checkpoint.mode='later' is not one of async, sync"),
    ({"checkpoint.keep": "0"}, "checkpoint.keep=0 must be >= 1"),
    ({"checkpoint.min_every": "9", "checkpoint.max_every": "3"},
     "checkpoint.min_every=9 and checkpoint.max_every=3 must satisfy 1 <= min_every <= max_every"),
    ({"optim.lr": "-1"}, "optim.lr=-1.0 must be > 0"),
])
def test_bad_values_fail_with_one_clear_line(overrides: dict, message: str):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(None, overrides)
    assert str(e.value) == message


def test_batch_smaller_than_world_is_refused():
    c = cfg.load(None, {"data.batch_size": "2"})
    with pytest.raises(cfg.ConfigError, match="data.batch_size=2 is smaller than the world size 3"):
        cfg.validate(c, world_size=3)


def test_digest_ignores_where_files_go_but_not_the_math():
    a = cfg.load(None, {"run.dir": "/x", "checkpoint.uri": "s3://b/p"})
    assert a.digest() == cfg.Config().digest()
    assert cfg.load(None, {"optim.lr": "0.1"}).digest() != a.digest()


def test_cli_prints_one_line_and_exits_2_on_a_bad_key(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "elastic_train.train", f"--run.dir={tmp_path}", "--stepz=3"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        "elastic-train: error: unknown config key 'stepz' (did you mean 'steps'?)"


def test_readme_table_is_the_one_generated_from_the_dataclasses():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert cfg.markdown_table() in readme, \
        "README's configuration table is stale: paste `python -m elastic_train.config`"
    assert [k.key for k in cfg.describe()] == list(cfg._all_keys())
    assert all(k.doc for k in cfg.describe()), "every key needs a docstring"


def test_train_help_lists_every_key_with_type_default_and_doc():
    proc = subprocess.run([sys.executable, "-m", "elastic_train.cli", "train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for k in cfg.describe():
        assert f"--{k.key} " in text, k.key
        assert f"(default: {k.default!r})" in text, k.key
        assert " ".join(k.doc.split()[:4]) in text, k.key
    assert "--checkpoint.mode {async,sync}" in text


@pytest.mark.parametrize("argv", [
    ["--model", "small", "--checkpoint.every=20", "--data.seq-len", "64"],
    ["--model=small", "--checkpoint.every", "20", "--data.seq_len=64"],
])
def test_both_override_spellings_reach_the_config(argv: list[str]):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    cfg.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    c = cfg.load(args.config, cfg.overrides_from(args, rest))
    assert (c.model, c.checkpoint.every, c.data.seq_len) == ("small", 20, 64)
