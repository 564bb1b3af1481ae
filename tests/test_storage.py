"""Run directories and model folders in a bucket: every small file goes through ``etils.epath``.

A ``gs://`` bucket is simulated by routing epath's backend to a local folder, so any code that still
used ``os``/``open`` on a bucket path would write beside it (or fail) and the checks below would
see nothing in the bucket. Orbax's array data (tensorstore) and TensorBoard take bucket paths
natively and are not part of this simulation.
"""

import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from etils.epath import gpath, testing as epath_testing

from medllama_jax import checkpointing, loading, lora, storage
from medllama_jax.config import get_config
from medllama_jax.eval import datasets
from medllama_jax.supervised import evaluate_or_read, write_comparison
from medllama_jax.tokenizer import copy_tokenizer_files, load_tokenizer, train_sentencepiece

BUCKET = "gs://medllama-test-bucket"


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch):
  """``gs://medllama-test-bucket/...`` read and written under ``tmp_path/bucket/...``."""
  # With TensorFlow installed epath sends bucket paths to tf.io.gfile, which the mock cannot reach.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  root = tmp_path / "bucket"
  root.mkdir()

  def local(path) -> str:
    path = str(path)
    return str(root / path.removeprefix(BUCKET + "/")) if path.startswith(BUCKET) else path

  def one_path(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_object(original, path, mode, *args, **kwargs):
    if set(mode) & set("wa"):  # a bucket has no folders: any object name can be written
      Path(local(path)).parent.mkdir(parents=True, exist_ok=True)
    return original(local(path), mode, *args, **kwargs)

  def glob_objects(original, pattern):
    if not str(pattern).startswith(BUCKET):
      return original(pattern)
    return [BUCKET + "/" + str(Path(match).relative_to(root)) for match in original(local(pattern))]

  def two_paths(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  mocks = {name: one_path for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove",
                                       "rmtree", "stat")}
  mocks["open"] = open_object
  mocks["glob"] = glob_objects
  mocks.update({name: two_paths for name in ("copy", "rename", "replace")})
  with epath_testing.mock_epath(**mocks):
    yield root


def test_paths_stay_paths():
  assert storage.absolute(f"{BUCKET}/run") == f"{BUCKET}/run"
  assert storage.absolute("run") == str(Path("run").resolve())
  assert storage.is_remote(f"{BUCKET}/x") and not storage.is_remote("/tmp/x")


def test_model_folder_files_in_a_bucket(bucket: Path):
  config = get_config("tiny")
  config.save_hf_json(f"{BUCKET}/model")
  assert json.loads((bucket / "model" / "config.json").read_text()) == config.to_hf_dict()
  assert type(config).load_hf_json(f"{BUCKET}/model").to_hf_dict() == config.to_hf_dict()
  with pytest.raises(FileNotFoundError, match=f"{BUCKET}/elsewhere: model folder not found"):
    type(config).load_hf_json(f"{BUCKET}/elsewhere")

  adapters = lora.LoraConfig(rank=4, alpha=8.0)
  adapters.save_json(f"{BUCKET}/adapters", f"{BUCKET}/model")
  assert lora.LoraConfig.load_json(f"{BUCKET}/adapters") == adapters
  assert lora.recorded_base_model(f"{BUCKET}/adapters") == f"{BUCKET}/model"


def test_tokenizer_read_from_and_copied_within_a_bucket(bucket: Path, tmp_path: Path):
  text = Path(str(importlib.resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"))
  model_file = train_sentencepiece(text, tmp_path / "sp", 512)
  (bucket / "src").mkdir()
  (bucket / "src" / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
  assert copy_tokenizer_files(f"{BUCKET}/src", f"{BUCKET}/dst") == ["tokenizer.model"]
  tokenizer = load_tokenizer(f"{BUCKET}/dst")
  local = load_tokenizer(bucket / "src")
  sample = "Troponin rose over 3 hours."
  assert tokenizer.encode(sample) == local.encode(sample)
  assert tokenizer.source.endswith("dst/tokenizer.model")  # named as the user gave it


def test_model_folder_is_staged_then_renamed_in_a_bucket(bucket: Path, monkeypatch):
  """``loading._write_folder``'s staging, replacement and rename, with Orbax's write stubbed out."""
  written = []
  monkeypatch.setattr(checkpointing, "save_params",
                      lambda directory, params: (written.append(directory),
                                                 (bucket / "model.tmp" / "params").mkdir(parents=True)))
  (bucket / "model" / "old").mkdir(parents=True)
  config = get_config("tiny")
  out = loading.save_model(f"{BUCKET}/model", {"w": np.zeros(2)}, config, None)
  assert out == f"{BUCKET}/model" and written == [f"{BUCKET}/model.tmp/params"]
  assert sorted(p.name for p in (bucket / "model").iterdir()) == ["config.json", "params"]
  assert not (bucket / "model.tmp").exists()
  assert loading.is_orbax_model_dir(f"{BUCKET}/model")


def test_parameter_checksums_written_and_read_in_a_bucket(bucket: Path):
  """``checksums.json`` is staged and renamed into place through epath, like every small file."""
  checksums = checkpointing.tensor_checksums({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
  checkpointing.write_checksums(f"{BUCKET}/model/params", checksums)
  assert [p.name for p in (bucket / "model" / "params").iterdir()] == ["checksums.json"]
  assert checkpointing.read_checksums(f"{BUCKET}/model/params") == checksums


def test_supervised_results_in_a_bucket(bucket: Path):
  (bucket / "before").mkdir()
  (bucket / "before" / "results.json").write_text(json.dumps(
      {"model": "m", "task_names": ["t"], "tasks": {"t": {"metrics": {"acc": 0.5}}}}))
  assert evaluate_or_read(f"{BUCKET}/before", "m", ["t"], "medllama", 0) == {"t": {"acc": 0.5}}
  summary = {"base_model": "m", "tuned_model": "n", "train_steps": 1, "global_batch_size": 2,
             "train_examples": 2, "epochs": 1.0, "template": "medllama", "prompt_variant": "release"}
  rows = {"pubmedqa": {"task": "t", "metric": "acc", "key": "release/acc", "before": 0.5,
                       "after": 1.0, "delta": 0.5}}
  write_comparison(BUCKET, summary, rows)
  assert json.loads((bucket / "supervised_results.json").read_text())["datasets"] == rows
  assert "| pubmedqa | acc | release | 0.5000 | 1.0000 | +0.5000 |" in (
      bucket / "supervised_results.md").read_text()


def test_mibe_datasets_read_from_a_bucket(bucket: Path):
  """Every dataset's evaluation set and few-shot pool, read from the bucket as from disk."""
  fixtures = Path(__file__).parent / "fixtures" / "mibe"
  shutil.copytree(fixtures, bucket / "mibe")
  for dataset in datasets.SPECS:
    for shots in (False, True):
      assert (datasets.read_records(dataset, f"{BUCKET}/mibe/{dataset}", shots)
              == datasets.read_records(dataset, str(fixtures / dataset), shots)), dataset
