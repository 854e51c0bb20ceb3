"""Configuration: presets, files, overrides, and one clear error per impossible setting."""
import dataclasses
import json

import pytest

from glmjax import config as C
from glmjax.errors import ConfigError


def test_glm130b_preset_has_exactly_the_released_parameter_count():
    cfg = C.resolve("glm-130b")
    assert cfg.num_params() == 128_697_794_560
    assert (cfg.head_dim, cfg.rotary_dtype, cfg.glu, cfg.tie_word_embeddings) == (128, "float16", True, True)
    assert cfg.deepnorm_alpha == pytest.approx(140 ** 0.5)
    assert cfg.embedding_init_std == pytest.approx(0.0052, abs=1e-4)  # Table 11's init_method_std


def test_chatglm6b_preset_is_the_hf_model():
    cfg = C.resolve("chatglm-6b")
    assert cfg.num_params() == 6_707_929_088  # 6.17B + the separate lm_head
    assert cfg.num_params() - cfg.param_counts()["lm_head"] == 6_173_286_400
    assert cfg.position_encoding_2d and not cfg.glu and not cfg.tie_word_embeddings


def test_reference_config_json_reads_with_rotary_mode(tmp_path):
    for mode, dt in (("sat0.2", "float16"), ("sat0.4", "float32")):
        p = tmp_path / f"{mode}.json"
        p.write_text(json.dumps({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                 "inner_hidden_size": 170, "vocab_size": 1024, "max_sequence_length": 64,
                                 "layernorm_epsilon": 1e-5, "rotary_mode": mode, "seed": 1, "tp": 2}))
        assert C.resolve(path=str(p)).rotary_dtype == dt


def test_yaml_file_with_model_section_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("model:\n  num_layers: 3\n  hidden_size: 32\n  num_attention_heads: 4\n"
                 "  inner_hidden_size: 64\n  vocab_size: 128\n")
    cfg = C.resolve(path=str(p), overrides=["num_layers=5", "dtype=bfloat16", "layernorm_epsilon=1e-6",
                                            "glu=false"])
    assert (cfg.num_layers, cfg.dtype, cfg.layernorm_epsilon, cfg.glu) == (5, "bfloat16", 1e-6, False)
    assert cfg.max_sequence_length == 2048  # default


@pytest.mark.parametrize("overrides, msg", [
    (["foo=1"], "unknown config key 'foo'"),
    (["num_attention_heads=5"], "num_attention_heads=5 does not divide hidden_size=64"),
    (["num_layers=0"], "num_layers must be a positive integer"),
    (["num_layers=2.5"], "num_layers must be an integer"),
    (["dtype=float8"], "dtype must be one of"),
    (["remat_policy=some"], "remat_policy must be one of"),
    (["hidden_dropout=1.5"], "hidden_dropout must be in"),
    (["position_encoding_2d=true", "num_attention_heads=32"], "must be a multiple of 4 for 2-D rotary"),
    (["glu=maybe"], "glu must be true or false"),
    (["rotary_mode=sat9"], "rotary_mode must be one of"),
    (["layernorm_epsilon=0"], "layernorm_epsilon must be > 0"),
    (["num_layers"], "is not of the form key=value"),
])
def test_bad_settings_are_one_clear_error(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        C.resolve("glm-tiny", overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        C.resolve(path=str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{num_layers: 2")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        C.resolve(path=str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        C.resolve(path=str(lst))
    part = tmp_path / "part.json"
    part.write_text('{"num_layers": 2}')
    with pytest.raises(ConfigError, match="missing required config key 'hidden_size'"):
        C.resolve(path=str(part))
    with pytest.raises(ConfigError, match="unknown preset 'glm-7b'"):
        C.resolve("glm-7b")


def test_config_is_frozen_and_replace_revalidates():
    cfg = C.resolve("glm-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3  # type: ignore[misc]
    assert cfg.replace(num_layers=4).num_layers == 4
    with pytest.raises(ConfigError):
        cfg.replace(hidden_size=65)


def test_experiment_model_files_are_the_presets():
    """experiments/models/*.json (for `glmjax forward --config`) cannot drift from the presets."""
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "experiments", "models")
    for name in ("glm-130b", "chatglm-6b"):
        assert C.resolve(path=os.path.join(root, f"{name}.json")) == C.resolve(name)
