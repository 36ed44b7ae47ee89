from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from lvd.config import ConfigError, load_config, parse_args, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Run:
    dir: str = "runs/x"
    steps: int = 10
    mode: Literal["full", "factorized"] = "full"
    compile: bool = False
    note: Optional[str] = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3.0e-4\n")
    cfg = parse_args(Run, ["--config", str(path), "optim.lr=1e-3", "compile=true", "mode=factorized"])
    assert cfg.steps == 20 and cfg.optim.lr == 1e-3 and cfg.compile is True and cfg.mode == "factorized"
    assert cfg.optim.betas == (0.9, 0.99) and cfg.dir == "runs/x"


def test_misspelt_key_names_key_and_closest():
    with pytest.raises(ConfigError) as err:
        load_config(Run, overrides=["optim.lrr=0.1"])
    assert "optim.lrr" in str(err.value) and "'lr'" in str(err.value)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as err:
        load_config(Run, overrides=["steps=many"])
    assert "steps" in str(err.value) and "int" in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(Run, overrides=["stepz=1", "mode=sideways", "optim.betas=[1]"])
    msg = str(err.value)
    assert "stepz" in msg and "mode" in msg and "optim.betas" in msg


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Run, overrides=["steps"])
    with pytest.raises(ConfigError, match="unknown option"):
        parse_args(Run, ["--steps", "3"])


def test_save_config_round_trips(tmp_path):
    cfg = load_config(Run, overrides=["note=hello", "optim.lr=0.5"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Run, tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == to_dict(cfg)
