"""Checkpoint conversion: HF ↔ Orbax round trips, Meta import, dtypes, sharded export, bad inputs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import glob  # noqa: E402
import importlib.resources  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import helpers  # noqa: E402
from medllama_jax import checkpointing, loading  # noqa: E402
from medllama_jax.config import LlamaConfig  # noqa: E402
from medllama_jax.cli import convert as cli  # noqa: E402
from medllama_jax.convert import hf, meta  # noqa: E402
from medllama_jax.convert.safetensors_io import SafetensorsReader, SafetensorsWriter  # noqa: E402
from medllama_jax.convert.sources import ConversionError, SafetensorsSource, TensorSource  # noqa: E402
from medllama_jax.convert.staging import staged_directory  # noqa: E402
from medllama_jax.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402

TOKENIZER_VOCAB = 512
SENTENCE = "The patient was started on metformin 500 mg twice daily."
BF16 = np.dtype(ml_dtypes.bfloat16)


def _demo_text() -> Path:
  return Path(str(importlib.resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"))


def _hf_tensors(directory) -> dict[str, torch.Tensor]:
  """Every tensor of a HF folder's safetensors files (one or several shards), via the reference reader."""
  out = {}
  files = sorted(glob.glob(os.path.join(os.fspath(directory), "*.safetensors")))
  assert files
  for path in files:
    shard = safetensors.torch.load_file(path)
    assert not set(shard) & set(out)
    out.update(shard)
  return out


def _assert_same_torch_tensors(actual: dict, expected: dict) -> None:
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    assert actual[name].dtype == value.dtype, name
    assert actual[name].shape == value.shape, name
    assert torch.equal(actual[name], value), name


def _assert_nothing_left(out_dir) -> None:
  """A failed conversion leaves neither the output folder nor a staging folder beside it."""
  out_dir = Path(out_dir)
  assert not out_dir.exists()
  leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(out_dir.name)]
  assert leftovers == []


# ---- Fixtures: one tokenizer, one float32 HF model with its conversions ----


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
  work = tmp_path_factory.mktemp("spm")
  return train_sentencepiece(_demo_text(), work / "tok", TOKENIZER_VOCAB)


@pytest.fixture(scope="module")
def hf_model():
  model = helpers.make_hf_model(seed=3, vocab_size=TOKENIZER_VOCAB, intermediate_size=160)
  return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model, tokenizer_model) -> Path:
  """A HF folder as ``save_pretrained`` writes it, plus a bare ``tokenizer.model``."""
  directory = tmp_path_factory.mktemp("hf") / "model"
  helpers.save_hf_model(hf_model, directory)
  shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
  return directory


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory, hf_dir) -> Path:
  out = tmp_path_factory.mktemp("orbax") / "model"
  hf.hf_to_orbax(str(hf_dir), str(out))
  return out


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory, orbax_dir) -> Path:
  out = tmp_path_factory.mktemp("export") / "model"
  hf.orbax_to_hf(str(orbax_dir), str(out))
  return out


@pytest.fixture(scope="module")
def orbax_params(orbax_dir):
  return helpers.orbax_tensors(orbax_dir)


# ---- HF → Orbax → HF ----


def test_model_folder_contents(orbax_dir, hf_dir):
  names = sorted(os.listdir(orbax_dir))
  assert names == ["config.json", "generation_config.json", "params", "tokenizer.model"]
  assert (orbax_dir / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
  assert checkpointing.checkpoint_layout(checkpointing.params_metadata(
      str(orbax_dir / "params"))) == "per_layer"
  assert json.loads((orbax_dir / "config.json").read_text())["torch_dtype"] == "float32"


def test_round_trip_float32_is_bit_exact(hf_dir, exported_dir):
  _assert_same_torch_tensors(_hf_tensors(exported_dir), _hf_tensors(hf_dir))
  assert json.loads((exported_dir / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.parametrize("variant", ["bfloat16", "tied"])
def test_round_trip_variants_are_bit_exact(tmp_path, variant):
  if variant == "bfloat16":
    model = helpers.make_hf_model(seed=4, dtype=torch.bfloat16)
  else:
    model = helpers.make_hf_model(seed=4, tie_word_embeddings=True, num_key_value_heads=1)
  source = helpers.save_hf_model(model, tmp_path / "hf")
  original = _hf_tensors(source)
  assert ("lm_head.weight" in original) == (variant != "tied")
  if variant == "bfloat16":
    assert all(t.dtype == torch.bfloat16 for t in original.values())
  hf.hf_to_orbax(source, str(tmp_path / "orbax"))
  stored = helpers.orbax_tensors(tmp_path / "orbax")
  assert {a.dtype for a in stored.values()} == {BF16 if variant == "bfloat16" else np.dtype(np.float32)}
  hf.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "out"))
  _assert_same_torch_tensors(_hf_tensors(tmp_path / "out"), original)
  exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported_config["torch_dtype"] == ("bfloat16" if variant == "bfloat16" else "float32")
  assert exported_config["tie_word_embeddings"] == (variant == "tied")


def _load_transformers(directory):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), output_loading_info=True, dtype=torch.float32)
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(key), (key, info[key])
  return model.eval()


def test_export_loads_in_transformers_with_same_logits(exported_dir, hf_model):
  reloaded = _load_transformers(exported_dir)
  assert isinstance(reloaded, transformers.LlamaForCausalLM)
  tokens = helpers.random_tokens(TOKENIZER_VOCAB, (2, 24), seed=1)
  np.testing.assert_array_equal(helpers.hf_logits(reloaded, tokens), helpers.hf_logits(hf_model, tokens))


def test_export_tokenizer_loads_in_transformers(exported_dir, tokenizer_model):
  bare = os.path.join(os.path.dirname(tokenizer_model), "bare")
  os.makedirs(bare, exist_ok=True)
  shutil.copyfile(tokenizer_model, os.path.join(bare, "tokenizer.model"))
  ours = load_tokenizer(bare)  # Meta's convention for a bare tokenizer.model
  assert ours.vocab_size == TOKENIZER_VOCAB
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported_dir))
  expected = ours.encode(SENTENCE)
  assert expected[0] == ours.bos_id and len(expected) > 5
  assert hf_tokenizer(SENTENCE)["input_ids"] == expected
  assert hf_tokenizer.encode(SENTENCE) == expected


def test_sharded_export(orbax_dir, hf_dir, hf_model, orbax_params, tmp_path):
  out = tmp_path / "sharded"
  hf.orbax_to_hf(str(orbax_dir), str(out), max_shard_bytes=64 * 1024)
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shards) > 2
  assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  index = json.loads((out / "model.safetensors.index.json").read_text())
  original = _hf_tensors(hf_dir)
  assert sorted(index["weight_map"]) == sorted(original)
  assert set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
  for name in shards:  # Each shard respects the limit unless it holds a single larger tensor.
    with SafetensorsReader(out / name) as reader:
      sizes = [reader.info(t).nbytes for t in reader.names()]
    assert sum(sizes) <= 64 * 1024 or len(sizes) == 1
  _assert_same_torch_tensors(_hf_tensors(out), original)
  tokens = helpers.random_tokens(TOKENIZER_VOCAB, (1, 12), seed=2)
  np.testing.assert_array_equal(helpers.hf_logits(_load_transformers(out), tokens),
                                helpers.hf_logits(hf_model, tokens))
  # And the sharded folder (read through its index) imports back to the same parameters.
  hf.hf_to_orbax(str(out), str(tmp_path / "reimported"))
  helpers.assert_bit_exact(helpers.orbax_tensors(tmp_path / "reimported"), orbax_params)


def test_sharded_export_via_cli(orbax_dir, hf_dir, tmp_path, capsys):
  out = tmp_path / "cli_sharded"
  assert cli.main(["orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(out),
                   "--max_shard_size", "100KB"]) == 0
  assert str(out) in capsys.readouterr().out
  assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
  _assert_same_torch_tensors(_hf_tensors(out), _hf_tensors(hf_dir))


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 1024**3), ("500MB", 500 * 1024**2),
                                           ("64KiB", 64 * 1024), ("1024", 1024), ("1.5kb", 1536)])
def test_parse_size(text, expected):
  assert cli.parse_size(text) == expected


def test_export_from_stacked_checkpoint(orbax_dir, hf_dir, tmp_path):
  loaded = loading.load_model(str(orbax_dir), helpers.one_device_mesh(), with_tokenizer=False,
                              scan_layers=True)
  stacked = tmp_path / "stacked"
  stacked.mkdir()
  checkpointing.save_params(str(stacked / "params"), loaded.params)
  shutil.copyfile(orbax_dir / "config.json", stacked / "config.json")
  assert checkpointing.checkpoint_layout(checkpointing.params_metadata(str(stacked / "params"))) \
      == "stacked"
  hf.orbax_to_hf(str(stacked), str(tmp_path / "out"))
  _assert_same_torch_tensors(_hf_tensors(tmp_path / "out"), _hf_tensors(hf_dir))


def test_pytorch_bin_input_matches_safetensors(tmp_path, hf_model, orbax_params):
  # transformers 5 ignores save_pretrained(safe_serialization=False); write the pickle directly.
  source = tmp_path / "bin"
  source.mkdir()
  hf_model.config.save_pretrained(str(source))
  torch.save(hf_model.state_dict(), source / "pytorch_model.bin")
  hf.hf_to_orbax(str(source), str(tmp_path / "out"))
  helpers.assert_bit_exact(helpers.orbax_tensors(tmp_path / "out"), orbax_params)


def test_bfloat16_tied_bin_input(tmp_path):
  # A tied model's state_dict holds lm_head.weight too (the shared tensor); the import ignores it.
  model = helpers.make_hf_model(seed=6, dtype=torch.bfloat16, tie_word_embeddings=True)
  assert "lm_head.weight" in model.state_dict()
  source = tmp_path / "bin"
  source.mkdir()
  model.config.save_pretrained(str(source))
  torch.save(model.state_dict(), source / "pytorch_model.bin")
  hf.hf_to_orbax(str(source), str(tmp_path / "from_bin"))
  hf.hf_to_orbax(helpers.save_hf_model(model, tmp_path / "st"), str(tmp_path / "from_st"))
  from_bin = helpers.orbax_tensors(tmp_path / "from_bin")
  assert {a.dtype for a in from_bin.values()} == {BF16}
  assert ("lm_head",) not in from_bin
  helpers.assert_bit_exact(from_bin, helpers.orbax_tensors(tmp_path / "from_st"))


# ---- Meta's release format ----


# dim 64 → 4·64·2/3 = 170; ×0.9 = 153; rounded up to a multiple of 32 = 160, the HF model's MLP width.
META_PARAMS = {"multiple_of": 32, "ffn_dim_multiplier": 0.9}


@pytest.mark.parametrize("num_shards", [1, 2])
def test_meta_import_equals_hf_import(tmp_path, hf_model, hf_dir, orbax_dir, orbax_params, num_shards):
  # The 2-rank case also carries the rope.freqs buffer of early releases (to be ignored).
  meta_dir = helpers.write_meta_checkpoint(hf_model, tmp_path / "meta", num_shards,
                                           rope_freqs=num_shards == 2, **META_PARAMS)
  assert len(glob.glob(os.path.join(meta_dir, "consolidated.*.pth"))) == num_shards
  out = tmp_path / "out"
  config = meta.meta_to_orbax(meta_dir, str(out), tokenizer_dir=str(hf_dir))
  helpers.assert_bit_exact(helpers.orbax_tensors(out), orbax_params)
  hf_config = LlamaConfig.load_hf_json(str(orbax_dir))
  assert LlamaConfig.load_hf_json(str(out)).to_hf_dict() == config.to_hf_dict()
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "resolved_head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
    assert getattr(config, field) == getattr(hf_config, field), field
  assert (out / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()


def test_meta_import_via_cli(tmp_path, hf_model, orbax_params, capsys):
  meta_dir = helpers.write_meta_checkpoint(hf_model, tmp_path / "meta", 2, **META_PARAMS)
  assert cli.main(["meta-to-orbax", "--meta_dir", meta_dir, "--out", str(tmp_path / "out"),
                   "--dtype", "bfloat16"]) == 0
  stored = helpers.orbax_tensors(tmp_path / "out")
  assert {a.dtype for a in stored.values()} == {BF16}
  helpers.assert_bit_exact(stored, {k: v.astype(BF16) for k, v in orbax_params.items()})


@pytest.mark.parametrize("interface", ["api", "cli"])
@pytest.mark.parametrize("overrides,fragments", [
    ({"multiple_of": 64}, ["MLP width of 192", "160"]),
    ({"vocab_size": 100}, ["vocab_size=100", "512 rows"]),
    ({"n_layers": None}, ["'n_layers'"]),
], ids=["mlp_width", "vocab_size", "missing_field"])
def test_meta_params_json_mismatch(tmp_path, hf_model, capsys, overrides, fragments, interface):
  params = {**META_PARAMS, **overrides}
  meta_dir = helpers.write_meta_checkpoint(hf_model, tmp_path / "meta", 2,
                                           **{k: v for k, v in params.items() if v is not None})
  if None in params.values():
    path = Path(meta_dir) / "params.json"
    content = json.loads(path.read_text())
    for key in [k for k, v in params.items() if v is None]:
      del content[key]
    path.write_text(json.dumps(content))
  out = tmp_path / "out"
  message = _run_failing(interface, ["meta-to-orbax", "--meta_dir", meta_dir, "--out", str(out)],
                         lambda: meta.meta_to_orbax(meta_dir, str(out)), ConversionError, capsys)
  assert os.path.join(meta_dir, "params.json") in message
  for fragment in fragments:
    assert fragment in message
  _assert_nothing_left(out)


@pytest.mark.parametrize("overrides", [{"n_layers": 3}, {"n_kv_heads": 1}, {"n_heads": 8}],
                         ids=["n_layers", "n_kv_heads", "n_heads"])
def test_meta_params_json_size_mismatch_names_params_json(tmp_path, hf_model, overrides):
  meta_dir = helpers.write_meta_checkpoint(hf_model, tmp_path / "meta", 2, **{**META_PARAMS, **overrides})
  with pytest.raises(ConversionError) as excinfo:
    meta.meta_to_orbax(meta_dir, str(tmp_path / "out"))
  _assert_nothing_left(tmp_path / "out")
  assert "params.json" in str(excinfo.value)


# ---- Dtypes ----


def test_bfloat16_conversion(tmp_path, hf_dir, orbax_params, capsys):
  out = tmp_path / "bf16"
  assert cli.main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
  stored = helpers.orbax_tensors(out)
  assert {a.dtype for a in stored.values()} == {BF16}
  helpers.assert_bit_exact(stored, {k: v.astype(BF16) for k, v in orbax_params.items()})
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  # Exported as stored, it loads in transformers as bfloat16.
  hf.orbax_to_hf(str(out), str(tmp_path / "hf"))
  exported = _hf_tensors(tmp_path / "hf")
  assert {t.dtype for t in exported.values()} == {torch.bfloat16}
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_dtype_override(tmp_path, orbax_dir, hf_dir):
  hf.orbax_to_hf(str(orbax_dir), str(tmp_path / "out"), dtype="bfloat16")
  exported = _hf_tensors(tmp_path / "out")
  original = _hf_tensors(hf_dir)
  _assert_same_torch_tensors(exported, {k: v.to(torch.bfloat16) for k, v in original.items()})
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unknown_dtype_is_rejected(tmp_path, hf_dir):
  with pytest.raises(ValueError, match="float8"):
    hf.hf_to_orbax(str(hf_dir), str(tmp_path / "out"), "float8")
  _assert_nothing_left(tmp_path / "out")


def test_load_model_keeps_stored_bfloat16(tmp_path, hf_dir):
  hf.hf_to_orbax(str(hf_dir), str(tmp_path / "bf16"), "bfloat16")
  loaded = loading.load_model(str(tmp_path / "bf16"), helpers.one_device_mesh(), with_tokenizer=False)
  assert loaded.config.param_dtype == "bfloat16"
  assert loaded.params["embed_tokens"].dtype == BF16


# ---- Bad inputs: a clear error naming the culprit, and no output left behind ----


def _rewrite_safetensors(path: Path, drop=(), add=None) -> None:
  """Rewrites a safetensors file without the ``drop`` tensors and with the ``add`` ones."""
  tensors = {k: v for k, v in safetensors.torch.load_file(str(path)).items() if k not in drop}
  tensors.update(add or {})
  safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _break_missing_tensor(d: Path):
  _rewrite_safetensors(d / "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"])
  return ConversionError, [str(d), "missing tensor", "model.layers.1.mlp.up_proj.weight"]


def _break_unexpected_tensor(d: Path):
  _rewrite_safetensors(d / "model.safetensors", add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
  return ConversionError, [str(d), "unexpected tensor", "model.layers.0.self_attn.q_proj.bias"]


def _edit_config(d: Path, **changes):
  config = json.loads((d / "config.json").read_text())
  config.update(changes)
  (d / "config.json").write_text(json.dumps(config))


def _break_shape(d: Path):
  _edit_config(d, intermediate_size=192)
  return ConversionError, [str(d / "model.safetensors"), "model.layers.0.mlp.gate_proj.weight",
                           "(160, 64)", "(192, 64)"]


def _break_kv_heads(d: Path):
  _edit_config(d, num_key_value_heads=3)
  return ValueError, [str(d / "config.json"), "num_kv_heads=3", "num_heads=4"]


def _break_hidden_act(d: Path):
  _edit_config(d, hidden_act="gelu")
  return ValueError, [str(d / "config.json"), "hidden_act", "gelu"]


def _break_truncated_safetensors(d: Path):
  path = d / "model.safetensors"
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size - 100)
  return ConversionError, [str(path), "truncated", "tensor '"]


def _break_corrupt_header(d: Path):
  path = d / "model.safetensors"
  data = bytearray(path.read_bytes())
  data[8:24] = b"\xff" * 16
  path.write_bytes(bytes(data))
  return ConversionError, [str(path), "header"]


def _break_truncated_bin(d: Path):
  state = safetensors.torch.load_file(str(d / "model.safetensors"))
  (d / "model.safetensors").unlink()
  path = d / "pytorch_model.bin"
  torch.save(state, path)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return ConversionError, [str(path)]


def _break_missing_config(d: Path):
  (d / "config.json").unlink()
  return FileNotFoundError, [str(d / "config.json")]


def _break_no_weights(d: Path):
  (d / "model.safetensors").unlink()
  return ConversionError, [str(d), "no model weights"]


def _break_index(d: Path):
  names = list(safetensors.torch.load_file(str(d / "model.safetensors")))
  weight_map = {name: "model.safetensors" for name in names}
  weight_map[names[-1]] = "model-00002-of-00002.safetensors"
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return ConversionError, [str(d / "model.safetensors.index.json"), "model-00002-of-00002.safetensors"]


BROKEN = {
    "index_lists_missing_shard": _break_index,
    "missing_tensor": _break_missing_tensor,
    "unexpected_tensor": _break_unexpected_tensor,
    "shape_mismatch": _break_shape,
    "kv_heads_not_dividing": _break_kv_heads,
    "bad_hidden_act": _break_hidden_act,
    "truncated_safetensors": _break_truncated_safetensors,
    "corrupt_header": _break_corrupt_header,
    "truncated_bin": _break_truncated_bin,
    "missing_config": _break_missing_config,
    "no_weights": _break_no_weights,
}


def _run_failing(interface, argv, api_call, error_type, capsys) -> str:
  """Runs the conversion through the Python API or the CLI; returns the error message."""
  if interface == "api":
    with pytest.raises(error_type) as excinfo:
      api_call()
    return str(excinfo.value)
  capsys.readouterr()
  assert cli.main(argv) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith("medllama-convert: error: ")
  assert "wrote" not in captured.out
  return captured.err


@pytest.mark.parametrize("interface", ["api", "cli"])
@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_bad_hf_input(tmp_path, hf_dir, capsys, breakage, interface):
  source = tmp_path / "hf"
  shutil.copytree(hf_dir, source)
  error_type, fragments = BROKEN[breakage](source)
  out = tmp_path / "out"
  message = _run_failing(interface, ["hf-to-orbax", "--hf_dir", str(source), "--out", str(out)],
                         lambda: hf.hf_to_orbax(str(source), str(out)), error_type, capsys)
  for fragment in fragments:
    assert fragment in message
  _assert_nothing_left(out)


@pytest.mark.parametrize("interface", ["api", "cli"])
def test_existing_output_is_untouched(tmp_path, hf_dir, capsys, interface):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  message = _run_failing(interface, ["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(out)],
                         lambda: hf.hf_to_orbax(str(hf_dir), str(out)), FileExistsError, capsys)
  assert str(out) in message and "already exists" in message
  assert sorted(os.listdir(out)) == ["keep.txt"]
  assert (out / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("interface", ["api", "cli"])
def test_export_into_existing_folder_fails(tmp_path, orbax_dir, capsys, interface):
  out = tmp_path / "out"
  out.mkdir()
  message = _run_failing(interface, ["orbax-to-hf", "--ckpt", str(orbax_dir), "--out", str(out)],
                         lambda: hf.orbax_to_hf(str(orbax_dir), str(out)), FileExistsError, capsys)
  assert str(out) in message
  assert os.listdir(out) == []
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_with_mismatched_config_fails(tmp_path, orbax_dir):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(orbax_dir, ckpt)
  _edit_config(ckpt, intermediate_size=192)
  with pytest.raises(ConversionError) as excinfo:
    hf.orbax_to_hf(str(ckpt), str(tmp_path / "out"))
  assert str(ckpt / "params") in str(excinfo.value)
  assert "layers_0/mlp/" in str(excinfo.value)
  _assert_nothing_left(tmp_path / "out")


def test_export_without_params_fails(tmp_path, orbax_dir):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  shutil.copyfile(orbax_dir / "config.json", ckpt / "config.json")
  with pytest.raises(FileNotFoundError, match=str(ckpt / "params")):
    hf.orbax_to_hf(str(ckpt), str(tmp_path / "out"))
  _assert_nothing_left(tmp_path / "out")


# ---- Permissions ----


@pytest.fixture(params=[0o022])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
  """The process umask set to ``request.param`` for one test, the previous one restored after it."""
  previous = os.umask(request.param)
  yield request.param
  os.umask(previous)


def _modes(directory: Path) -> dict[str, int]:
  """The permission bits of ``directory`` and of everything under it, by relative path."""
  return {os.path.relpath(p, directory): p.stat().st_mode & 0o7777
          for p in [directory, *directory.rglob("*")]}


def _umask_modes(directory: Path, umask: int) -> dict[str, int]:
  """What ``_modes`` gives for a tree created under ``umask``: folders 0777, files 0666, less it."""
  return {os.path.relpath(p, directory): (0o777 if p.is_dir() else 0o666) & ~umask
          for p in [directory, *directory.rglob("*")]}


@pytest.mark.parametrize("umask", [0o027], indirect=True)
def test_staged_folder_gets_the_umask_mode(tmp_path, umask):
  with staged_directory(str(tmp_path / "out")) as staging:
    (Path(staging) / "sub").mkdir()
    (Path(staging) / "sub" / "file").write_text("x")
  assert _modes(tmp_path / "out") == {".": 0o750, "sub": 0o750, os.path.join("sub", "file"): 0o640}


def test_converted_and_exported_folders_get_the_umask_modes(tmp_path, hf_dir, umask):
  """Under umask 022 a model folder and a HF export are 0755 with 0644 files, even from a source
  whose files are private (0600): side files are copied without their mode."""
  source = tmp_path / "private"
  shutil.copytree(hf_dir, source)
  for path in source.iterdir():
    path.chmod(0o600)
  hf.hf_to_orbax(str(source), str(tmp_path / "orbax"))
  hf.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "export"))
  for folder in (tmp_path / "orbax", tmp_path / "export"):
    modes = _modes(folder)
    assert modes[os.curdir] == 0o755 and modes["generation_config.json"] == 0o644
    assert modes == _umask_modes(folder, umask)


# ---- Streaming ----


class _CountingSource(TensorSource):
  """A fake checkpoint of zeros that records every read."""

  def __init__(self, rules):
    self._shapes = {r.hf_name: r.hf_shape for r in rules}
    self.reads: list[str] = []

  def names(self):
    return list(self._shapes)

  def shape(self, name):
    return self._shapes[name]

  def read(self, name):
    self.reads.append(name)
    return np.zeros(self._shapes[name], np.float32)

  def where(self, name):
    return "<memory>"


def test_converted_tensors_reads_lazily():
  config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                       num_kv_heads=1)
  rules = hf.tensor_rules(config)
  source = _CountingSource(rules)
  items = hf.converted_tensors(source, rules, None)
  assert inspect.isgenerator(items)
  assert source.reads == []
  path, array = next(items)
  assert source.reads == ["model.embed_tokens.weight"]
  assert path == ("embed_tokens",) and array.shape == (32, 16)
  path, array = next(items)
  assert len(source.reads) == 2 and path == ("layers_0", "input_layernorm", "scale")
  rest = list(items)
  assert len(source.reads) == len(rules) == 2 + len(rest)


def test_hf_to_orbax_streams_one_tensor_at_a_time(tmp_path, hf_dir, monkeypatch, orbax_params):
  """Each tensor is read from the source only when the writer asks for it, never all up front."""
  reads = []
  original_read = SafetensorsSource.read
  original_save = checkpointing.save_params_streaming

  def counting_read(self, name):
    reads.append(name)
    return original_read(self, name)

  def checking_save(directory, tensors):
    def checked():
      for written, item in enumerate(tensors, 1):
        assert len(reads) == written  # Read exactly when handed over; nothing read ahead.
        yield item
    return original_save(directory, checked())

  monkeypatch.setattr(SafetensorsSource, "read", counting_read)
  monkeypatch.setattr(checkpointing, "save_params_streaming", checking_save)
  hf.hf_to_orbax(str(hf_dir), str(tmp_path / "out"))
  assert len(reads) == len(orbax_params) == len(set(reads))
  helpers.assert_bit_exact(helpers.orbax_tensors(tmp_path / "out"), orbax_params)


def test_safetensors_writer_used_for_export_is_streaming(tmp_path):
  """The writer rejects out-of-order writes, so the exporter must stream tensors in declared order."""
  with pytest.raises(ValueError, match="out of order"):
    with SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.float32, (2,)), ("b", np.float32, (2,))]) as w:
      w.write("b", np.zeros(2, np.float32))
  assert os.listdir(tmp_path) == []
