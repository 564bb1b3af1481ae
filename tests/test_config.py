"""LlamaConfig: presets, HF config.json in and out, and errors that name the offending field."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

from medllama_jax.config import PRESETS, RUNTIME_FIELDS, LlamaConfig, get_config  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("name,expected", [("llama2_7b", 6.74e9), ("llama2_13b", 13.0e9),
                                           ("llama2_70b", 69.0e9)])
def test_preset_sizes(name, expected):
  assert abs(PRESETS[name].num_params() - expected) / expected < 0.01


def test_preset_heads():
  assert PRESETS["llama2_7b"].num_kv_heads == PRESETS["llama2_7b"].num_heads == 32
  assert PRESETS["llama2_13b"].num_kv_heads == PRESETS["llama2_13b"].num_heads == 40
  assert (PRESETS["llama2_70b"].num_heads, PRESETS["llama2_70b"].num_kv_heads) == (64, 8)
  for name in ("llama2_7b", "llama2_13b", "llama2_70b"):
    assert PRESETS[name].resolved_head_dim == 128


def test_get_config_overrides_and_unknown_names():
  config = get_config("tiny", dtype="bfloat16", scan_layers=False)
  assert config.dtype == "bfloat16" and not config.scan_layers
  assert config.hidden_size == PRESETS["tiny"].hidden_size
  with pytest.raises(KeyError, match="llama2_7b"):
    get_config("llama9_1t")


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True),
    dict(head_dim=32, num_heads=4, num_kv_heads=1),
    dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
    dict(eos_token_id=(2, 7), pad_token_id=0, bos_token_id=None),
])
def test_num_params_matches_transformers(overrides):
  config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4,
                       num_kv_heads=2).replace(**overrides)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
  unique = {id(p): p.numel() for p in hf_model.parameters()}  # Tied weights counted once.
  assert config.num_params() == sum(unique.values())


ROUND_TRIP = [
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=16),
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4,
                num_kv_heads=1, head_dim=32, tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling=dict(LLAMA3_SCALING), eos_token_id=(2, 5), pad_token_id=0,
                max_position_embeddings=131072, rms_norm_eps=1e-5),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=["plain", "llama3"])
def test_hf_dict_round_trip(config):
  hf = config.to_hf_dict()
  json.dumps(hf)  # Serializable as config.json.
  assert LlamaConfig.from_hf_dict(hf) == config
  runtime = dict(dtype="bfloat16", scan_layers=False, remat_policy="dots", attention_impl="dot_product")
  assert LlamaConfig.from_hf_dict(hf, **runtime) == config.replace(**runtime)


def test_round_trip_resolves_default_head_dim():
  config = get_config("tiny")
  assert config.head_dim is None
  back = LlamaConfig.from_hf_dict(config.to_hf_dict())
  assert back.head_dim == config.resolved_head_dim == 16
  assert back == config.replace(head_dim=16)


def test_to_hf_dict_has_no_runtime_fields():
  hf = get_config("tiny", dtype="bfloat16", scan_layers=False, remat_policy="full").to_hf_dict()
  for field in RUNTIME_FIELDS:
    assert field not in hf
  assert hf["torch_dtype"] == "float32"  # The stored dtype, not the compute dtype.


def test_to_hf_dict_is_accepted_by_transformers():
  config = ROUND_TRIP[1]
  hc = transformers.LlamaConfig(**config.to_hf_dict())
  assert hc.num_key_value_heads == config.num_kv_heads
  assert hc.head_dim == config.resolved_head_dim
  assert hc.rope_parameters["rope_type"] == "llama3"
  assert hc.rope_parameters["rope_theta"] == config.rope_theta
  assert hc.rope_parameters["factor"] == LLAMA3_SCALING["factor"]
  assert hc.tie_word_embeddings


def _hf_base(**changes):
  base = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=160,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  base.update(changes)
  return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("changes,fragments", [
    (dict(vocab_size=None), ["missing required field", "vocab_size"]),
    (dict(num_hidden_layers=None, hidden_size=None), ["hidden_size", "num_hidden_layers"]),
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
    (dict(attention_bias=True), ["attention_bias"]),
    (dict(mlp_bias=True), ["mlp_bias"]),
    (dict(num_key_value_heads=3), ["num_heads=4", "num_kv_heads=3"]),
    (dict(num_attention_heads=5, num_key_value_heads=5), ["hidden_size=64", "num_heads=5"]),
    (dict(head_dim=15), ["head_dim=15"]),
    (dict(model_type="gpt2"), ["model_type", "gpt2"]),
    (dict(model_type="mistral", sliding_window=4096), ["model_type", "mistral"]),
    (dict(pretraining_tp=2), ["pretraining_tp"]),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), ["rope_scaling", "llama3"]),
])
def test_from_hf_dict_errors_name_the_field(changes, fragments):
  with pytest.raises(ValueError) as excinfo:
    LlamaConfig.from_hf_dict(_hf_base(**changes), source="some/dir/config.json")
  message = str(excinfo.value)
  assert message.startswith("some/dir/config.json: ")
  for fragment in fragments:
    assert fragment in message


@pytest.mark.parametrize("changes,fragment", [
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(dtype="float33"), "float33"),
])
def test_bad_runtime_fields(changes, fragment):
  with pytest.raises(Exception, match=fragment):
    get_config("tiny", **changes)


def test_from_hf_dict_defaults():
  config = LlamaConfig.from_hf_dict(_hf_base(num_key_value_heads=None))
  assert config.num_kv_heads == config.num_heads == 4  # MHA when HF omits num_key_value_heads.
  assert config.rope_theta == 10000.0 and config.rope_scaling is None
  assert not config.tie_word_embeddings


def test_legacy_rope_scaling_forms():
  legacy = {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}
  config = LlamaConfig.from_hf_dict(_hf_base(rope_scaling={**legacy, "type": "llama3"}, rope_theta=5e5))
  assert config.rope_scaling_dict["rope_type"] == "llama3"
  assert config.rope_scaling_dict["factor"] == 8.0
  default = LlamaConfig.from_hf_dict(_hf_base(rope_scaling={"rope_type": "default"}))
  assert default.rope_scaling is None
  new_style = LlamaConfig.from_hf_dict(_hf_base(rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 250000.0}))
  assert new_style.rope_theta == 250000.0 and new_style.rope_scaling is None


def test_config_is_hashable_and_normalizes_containers():
  a = LlamaConfig(rope_scaling=dict(LLAMA3_SCALING), eos_token_id=[2, 3])
  b = LlamaConfig(rope_scaling=dict(reversed(list(LLAMA3_SCALING.items()))), eos_token_id=(2, 3))
  assert a == b and hash(a) == hash(b)
  assert a.eos_token_ids == (2, 3)
  assert LlamaConfig(eos_token_id=None).eos_token_ids == ()
  assert LlamaConfig().eos_token_ids == (2,)


@pytest.mark.parametrize("hf_kwargs,expected", [
    (dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
     LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6)),
    (dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
          rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), max_position_embeddings=131072,
          rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128009]),
     LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                 num_kv_heads=1, head_dim=32, tie_word_embeddings=True, rope_theta=500000.0,
                 rope_scaling=dict(LLAMA3_SCALING), max_position_embeddings=131072, rms_norm_eps=1e-5,
                 bos_token_id=128000, eos_token_id=(128001, 128009))),
], ids=["llama2_style", "llama3_style"])
def test_load_hf_json_of_transformers_config(tmp_path, hf_kwargs, expected):
  transformers.LlamaConfig(**hf_kwargs).save_pretrained(str(tmp_path))
  assert LlamaConfig.load_hf_json(str(tmp_path)) == expected
  assert LlamaConfig.load_hf_json(str(tmp_path), scan_layers=False) == expected.replace(scan_layers=False)


def test_save_hf_json_round_trip(tmp_path):
  config = ROUND_TRIP[1]
  path = config.save_hf_json(str(tmp_path))
  assert path == str(tmp_path / "config.json")
  assert LlamaConfig.load_hf_json(str(tmp_path)) == config
  # transformers reads our file too.
  assert transformers.AutoConfig.from_pretrained(str(tmp_path)).num_key_value_heads == 1


def test_load_hf_json_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
    LlamaConfig.load_hf_json(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON") as excinfo:
    LlamaConfig.load_hf_json(str(tmp_path))
  assert str(tmp_path / "config.json") in str(excinfo.value)
  (tmp_path / "config.json").write_text(json.dumps(_hf_base(hidden_act="relu")))
  with pytest.raises(ValueError) as excinfo:
    LlamaConfig.load_hf_json(str(tmp_path))
  assert str(tmp_path / "config.json") in str(excinfo.value) and "hidden_act" in str(excinfo.value)
