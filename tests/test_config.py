"""Config: TOML + `--section.key=value` overrides; bad input fails at start with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from elastic_train import config as cfg

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
def test_shipped_configs_load(toml: Path):
    cfg.load(str(toml))


@pytest.mark.parametrize("overrides,message", [
    ({"checkpont.every": "5"},
     "unknown config key 'checkpont.every' (did you mean 'checkpoint.every'?)"),
    ({"model": "huge"}, "model='huge' is not a known size; expected one of tiny, small, base"),
    ({"steps": "0"}, "steps=0 must be >= 1"),
    ({"steps": "ten"}, "steps='ten' is not a valid int"),
    ({"checkpoint.mode": "later"}, "checkpoint.mode='later' is not one of async, sync"),
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


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [k for k in cfg._all_keys() if f"| `{k}` |" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
