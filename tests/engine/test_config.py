import json

import pytest

from engine.config import (TINY, ConfigError, PERSONAPLEX_7B, get_preset, lm_config_from_reference, load_config,
                           mimi_config_from_reference)

from conftest import TINY as TINY_DIR


def test_reference_json_gives_the_tiny_preset():
    cfg = load_config(TINY_DIR / "config.json")
    assert cfg.lm == TINY.lm
    assert cfg.mimi == TINY.mimi


def test_presets_round_trip_through_reference_names():
    for preset in (PERSONAPLEX_7B, TINY):
        d = preset.to_reference_json()
        assert lm_config_from_reference(d["lm"]) == preset.lm
        assert mimi_config_from_reference(d["mimi"]) == preset.mimi


def test_7b_values():
    c = PERSONAPLEX_7B
    assert c.lm.temporal.hidden == 11264 and c.lm.depformer.hidden == 2816
    assert c.lm.temporal.window == 2999 and c.lm.ring_size == 4 and c.mimi.frame_size == 1920
    assert get_preset("personaplex-7b-v1") is c


@pytest.mark.parametrize("field, value, msg", [
    ("gating", "gelu", "'gating'"), ("norm", "layer_norm", "'norm'"), ("delays", [0, 1], "delays"),
    ("positional_embedding", "sin", "'positional_embedding'")])
def test_unsupported_config_is_a_clear_error(field, value, msg):
    d = TINY.to_reference_json()["lm"]
    d[field] = value
    with pytest.raises(ConfigError, match=msg):
        lm_config_from_reference(d)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "lmonly.json").write_text(json.dumps(TINY.to_reference_json()["lm"]))
    assert load_config(tmp_path / "lmonly.json").lm == TINY.lm
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("nope")
