"""Models whose tokenizer is not LLaMA 2's, end to end: a LLaMA-3-style ``tokenizer.json`` (BOS by
its template) runs the demo's pre-training, instruction tuning and a MIBE evaluation; generation on
a LLaMA-3-style and on a GPT-2-style tokenizer without BOS feeds the ids ``AutoTokenizer`` gives and
continues exactly as ``transformers`` does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import seqio
import torch
import transformers

import helpers
import tokenizer_families as families
from medllama_jax import demo, loading, partitioning, tokenizer
from medllama_jax.cli import eval as eval_cli
from medllama_jax.cli import generate as generate_cli
from seqio_tasks import instruct, mibe, pretrain

PROMPTS = ["The patient was started on", "Chest X-ray shows"]
NEW_TOKENS = 8
TRAIN_STEPS = 2


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """The demo's model architecture, random, with a LLaMA-3-style tokenizer."""
  root = tmp_path_factory.mktemp("llama3_model")
  tok_dir = families.build("llama3", root / "tokenizer")
  mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return Path(demo.write_init_model(str(root / "model"), demo.demo_model_config(), str(tok_dir),
                                    mesh))


def run_trainer(gin_file: str, run_dir: Path, **macros: str) -> subprocess.CompletedProcess:
  flags = [f'--gin.{name}="{value}"' for name, value in macros.items()]
  flags += [f"--gin.medllama_jax.train.loop.train.{key}={value}" for key, value in
            (("total_steps", TRAIN_STEPS), ("save_every", TRAIN_STEPS), ("log_every", 1),
             ("eval_every", TRAIN_STEPS))]
  return subprocess.run([sys.executable, "-m", "medllama_jax.cli.train", "--gin_file", gin_file,
                         f'--gin.RUN_DIR="{run_dir}"', *flags], capture_output=True, text=True,
                        timeout=600, env=dict(os.environ))


def train_losses(run_dir: Path) -> list[float]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [row["loss"] for row in rows if row["split"] == "train"]


def test_pretraining_runs_on_a_llama3_tokenizer(llama3_model: Path, tmp_path: Path):
  demo.prepare_corpora(str(tmp_path / "data"))
  tok = tokenizer.load_tokenizer(llama3_model)
  name = pretrain.register_text_task("llama3_pubmed", str(tmp_path / "data" / "pubmed_abstracts"),
                                     str(llama3_model))
  [document] = seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False
                                                           ).take(1).as_numpy_iterator()
  ids = document["targets"].tolist()
  assert ids[0] == tok.bos_id == tok.prefix_ids[0] and ids[-1] == tok.eos_id
  assert tok.decode(ids).strip() and tok.eos_id not in ids[:-1]

  run = run_trainer("demo/pretrain_demo.gin", tmp_path / "run", DATA_DIR=tmp_path / "data",
                    INIT_CHECKPOINT=llama3_model)
  assert run.returncode == 0, run.stderr[-3000:]
  losses = train_losses(tmp_path / "run")
  assert len(losses) == TRAIN_STEPS and all(math.isfinite(x) for x in losses)
  assert (tmp_path / "run" / "final_model" / "tokenizer.json").is_file()


def test_instruction_tuning_runs_on_a_llama3_tokenizer(llama3_model: Path, tmp_path: Path):
  tok = tokenizer.load_tokenizer(llama3_model)
  name = instruct.register_instruct_task("llama3_instruct", instruct.demo_sample_path(),
                                         str(llama3_model), validation_fraction=0.1)
  [example] = seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False
                                                          ).take(1).as_numpy_iterator()
  ids, weights = example["targets"].tolist(), example["loss_weights"].tolist()
  assert ids[0] == tok.bos_id and weights[0] == 0 and ids[-1] == tok.eos_id and weights[-1] == 1

  run = run_trainer("demo/instruct_demo.gin", tmp_path / "run", INIT_CHECKPOINT=llama3_model)
  assert run.returncode == 0, run.stderr[-3000:]
  losses = train_losses(tmp_path / "run")
  assert len(losses) == TRAIN_STEPS and all(math.isfinite(x) for x in losses)


def test_mibe_evaluation_runs_on_a_llama3_tokenizer(llama3_model: Path, tmp_path: Path):
  tok = tokenizer.load_tokenizer(llama3_model)
  data_dir = demo.demo_data_path("mibe")
  [name] = mibe.register_mibe_tasks(data_dir, str(llama3_model), datasets=["pubmedqa"])
  [example] = seqio.get_mixture_or_task(name).get_dataset(None, split=mibe.SPLIT, shuffle=False
                                                          ).take(1).as_numpy_iterator()
  prompt = example["inputs_pretokenized"].decode()
  assert example["inputs"].tolist() == tok.encode(prompt) and example["inputs"][0] == tok.bos_id

  assert eval_cli.main(["--model", str(llama3_model), "--data_dir", data_dir, "--tasks", "pubmedqa",
                        "--max_new_tokens", "4", "--out", str(tmp_path / "eval")]) == 0
  metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"][name]["metrics"]
  assert metrics and all(v is None or math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("family", ["llama3", "gpt2_no_bos"])
def test_generation_feeds_autotokenizer_ids_and_continues_as_transformers(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture):
  tok_dir = families.build(family, tmp_path / "tokenizer")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
  hf_model = helpers.make_hf_model(seed=5, vocab_size=len(hf_tok), eos_token_id=hf_tok.eos_token_id,
                                   bos_token_id=hf_tok.bos_token_id)
  model_dir = helpers.save_hf_model(hf_model, tmp_path / "hf")
  tokenizer.copy_tokenizer_files(tok_dir, model_dir)
  argv = ["--model", model_dir, "--max_new_tokens", str(NEW_TOKENS), "--json", "--mesh", "1,1,1"]
  for prompt in PROMPTS:
    argv += ["--prompt", prompt]
  assert generate_cli.main(argv) == 0
  ours = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  for prompt, line in zip(PROMPTS, ours):
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert (ids[0, 0].item() == hf_tok.bos_token_id) == (family == "llama3")
    with torch.no_grad():
      out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=hf_tok.eos_token_id,
                              pad_token_id=hf_tok.eos_token_id)
    theirs = out[0, ids.shape[1]:].tolist()
    if hf_tok.eos_token_id in theirs:
      theirs = theirs[:theirs.index(hf_tok.eos_token_id)]
    assert line["token_ids"] == theirs, prompt
    assert line["text"] == hf_tok.decode(theirs, skip_special_tokens=True)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path):
  tok_dir = families.build("llama3", tmp_path / "tokenizer")
  model_dir = helpers.save_hf_model(helpers.make_hf_model(vocab_size=256), tmp_path / "hf")
  tokenizer.copy_tokenizer_files(tok_dir, model_dir)
  mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"tokenizer\.json has \d+ ids but .* vocab_size 256"):
    loading.load_model(model_dir, mesh)
