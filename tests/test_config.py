from dataclasses import dataclass, field

import pytest

from gpfm.config import load_config, save_config
from gpfm.io import GpfmError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(Cfg, p, ["optim.lr=2e-4", "tags=[a, b]", "optim.betas=[0.8, 0.9]"])
    assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.tags == ["a", "b"] and cfg.optim.betas == (0.8, 0.9)
    assert isinstance(cfg.optim.lr, float)


def test_base_file_and_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\noptim:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\n")
    cfg = load_config(Cfg, tmp_path / "child.yaml")
    assert (cfg.name, cfg.steps, cfg.optim.lr) == ("child", 7, 0.5)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Cfg, tmp_path / "saved.yaml") == cfg


def test_unknown_key_names_dotted_key(tmp_path):
    with pytest.raises(GpfmError, match="unknown config key 'optim.lrr'"):
        load_config(Cfg, None, ["optim.lrr=1"])
    with pytest.raises(GpfmError, match="expected int"):
        load_config(Cfg, None, ["steps=abc"])
