"""TrainConfig: TOML + --set overrides, and every invalid value is an error naming its key."""

from pathlib import Path

import pytest

from sdlora.resources import CONFIGS_DIR
from sdlora.train.config import ConfigError, TrainConfig, parse_override

CONFIGS = CONFIGS_DIR


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return d


def test_shipped_configs_parse(data_dir):
    for name in ("style_sd15.toml", "dreambooth_sd15.toml", "tiny.toml"):
        cfg = TrainConfig.from_toml(CONFIGS / name, [f"train_data_dir={data_dir}"])
        assert cfg.train_data_dir == str(data_dir)
    tiny = TrainConfig.from_toml(CONFIGS / "tiny.toml", [f"train_data_dir={data_dir}"])
    assert tiny.resolution == 64 and tiny.mixed_precision == "no"


def test_overrides_are_typed(data_dir):
    cfg = TrainConfig.from_toml(None, [f"train_data_dir={data_dir}", "network_dim=8", "learning_rate=3e-4",
                                       "shuffle_caption=true", "trigger_word=zzz", 'sample_prompts=["a", "b"]',
                                       "network_alpha=4"])
    assert cfg.network_dim == 8 and cfg.learning_rate == 3e-4 and cfg.shuffle_caption is True
    assert cfg.trigger_word == "zzz" and cfg.sample_prompts == ["a", "b"]
    assert isinstance(cfg.network_alpha, float)


def test_round_trip_through_toml(tmp_path, data_dir):
    cfg = TrainConfig.from_toml(None, [f"train_data_dir={data_dir}", "network_dim=7", "optimizer_args={betas=[0.9, 0.99]}"])
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    again = TrainConfig.from_toml(p)
    assert again == cfg


@pytest.mark.parametrize("override, key", [
    ("learning_rate=-1e-4", "learning_rate"),
    ("network_dim=0", "network_dim"),
    ("resolution=500", "resolution"),
    ("resolution=abc", "resolution"),
    ("optimizer_type=SGD", "optimizer_type"),
    ("lr_scheduler=step", "lr_scheduler"),
    ("mixed_precision=fp8", "mixed_precision"),
    ("network_preset=everything", "network_preset"),
    ("network_type=nope", "network_type"),
    ("caption_dropout_rate=1.5", "caption_dropout_rate"),
    ("max_train_steps=0", "max_train_steps"),
    ("network_alpha=0", "network_alpha"),
    ("output_name=../../etc", "output_name"),
    ("no_such_option=1", "no_such_option"),
    ("with_prior_preservation=true", "class_prompt"),
    ("learning_rate=3", "learning_rate"),  # a typo for 3e-3: past the option's largest value
    ("seed=99999999999", "seed"),
    ("sample_guidance=1e9", "sample_guidance"),
])
def test_bad_values_name_the_key(data_dir, override, key):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(None, [f"train_data_dir={data_dir}", override])
    assert e.value.key == key
    assert key in str(e.value)


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(None, [])
    assert e.value.key == "train_data_dir"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(None, [f"train_data_dir={tmp_path / 'nope'}"])
    assert e.value.key == "train_data_dir" and "not found" in str(e.value)


def test_unknown_key_in_file(tmp_path, data_dir):
    p = tmp_path / "c.toml"
    p.write_text(f'train_data_dir = "{data_dir}"\n[network]\nnetwork_dimm = 4\n')
    with pytest.raises(ConfigError, match="network_dimm"):
        TrainConfig.from_toml(p)


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError):
        parse_override("learning_rate")


def test_every_numeric_option_has_a_range():
    """Bounds live in the config (the CLI, TOML files and the page check the same ranges)."""
    numeric = [f for f in TrainConfig.field_info() if f["type"] in ("int", "float") and f.get("ui", True)]
    assert len(numeric) > 20
    missing = [f["name"] for f in numeric if f["max"] is None or f["min"] is None]
    assert not missing, missing


def test_field_info_covers_every_field():
    info = TrainConfig.field_info()
    names = [f["name"] for f in info]
    assert "network_dim" in names and "learning_rate" in names
    assert all(f["help"] for f in info)
    assert {f["group"] for f in info} == {"main", "advanced"}
