"""The embedded default job: Me-LLaMA's continual pre-training cycle, end to end, small, on CPU.

  python -m medllama_jax.cli.demo --out demo_output      (what scripts/demo.sh runs)

Runs in a few minutes on 8 simulated CPU devices (a data × fsdp × tensor = 2 × 2 × 2 mesh). Each step
is announced when it starts, with what it wrote below it and the trainer's live progress; details
go to the log files in ``OUT/logs``. The steps:
  1. train a SentencePiece tokenizer (LLaMA conventions) on the text shipped in the package;
  2. prepare the shipped raw corpus samples (PubMed XML, PMC JATS, MIMIC-III/IV note CSVs, MIMIC-CXR
     reports, RedPajama jsonl; all invented text) into TFRecord shards, as ``scripts/prepare_corpus.py``
     does for the real corpora;
  3. write the starting model folder (a random small LLaMA standing in for a converted LLaMA2);
  4. continue its pre-training with ``medllama-train`` on the 15 : 1 : 4 seqio mixture
     (``gin/demo/pretrain_demo.gin``), kill the run with SIGKILL after a checkpoint, and resume it with
     the same command to the end;
  5. instruction-tune the result with LoRA on the shipped instruction sample
     (``gin/demo/instruct_demo.gin``: response-only loss, the documented chat template), which ends
     with the adapters and a merged model folder;
  6. ``orbax-to-hf``: export the tuned model to a Hugging Face folder, check that ``transformers``
     loads it and computes the same logits (when transformers is installed), and re-import it bit for bit;
  7. generate with the KV-cache decoder on the same mesh: the pre-trained model continues medical
     text, the tuned one answers questions through the chat template;
  8. ``medllama-eval`` of the tuned model, prompted through its chat template, on the shipped sample
     of every MIBE dataset and MMLU (``demo_data/mibe``: invented examples in the real formats),
     which writes results.json and results.md with every metric of every task.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import contextlib  # noqa: E402
import glob  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from importlib import resources  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from medllama_jax import (chat, checkpointing, decode, loading, partitioning, progress,  # noqa: E402
                          tokenizer)
from medllama_jax.cli import generate, gin_flags  # noqa: E402
from medllama_jax.config import LlamaConfig, model_config  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.data import records, token_stats  # noqa: E402
from medllama_jax.data.vocab import model_vocabulary  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

DEMO_PROMPTS = ("The patient presented with", "Metformin is a first-line treatment for")
DEMO_GIN = "demo/pretrain_demo.gin"
INSTRUCT_GIN = "demo/instruct_demo.gin"
CHAT_PROMPTS = ("What is metformin used for?",)
KILL_AFTER_STEP = 20
NUM_STEPS = 8
STEP_INDENT = "      "
# The evaluation compiles a program per prompt length bucket, which costs more than running the
# few examples of each sample: one device (the simulated 8-device mesh compiles slower), and
# buckets of 256 tokens (the demo model's context is 512).
EVAL_MESH = "1,1,1"
EVAL_LENGTH_BUCKET = 256

# Corpus folder (a task of the pre-training mixture) → (preparer format, shipped sample).
DEMO_CORPORA = {
    "pubmed_abstracts": ("pubmed_xml", "pubmed_sample.xml.gz"),
    "pmc_fulltext": ("pmc_nxml", "pmc_oa_sample"),
    "mimic_iii_notes": ("mimic_iii_notes", "mimic_iii_noteevents_sample.csv.gz"),
    "mimic_iv_notes": ("mimic_iv_notes", "mimic_iv_discharge_sample.csv.gz"),
    "mimic_cxr_reports": ("mimic_cxr", "mimic_cxr_sample"),
    "redpajama": ("jsonl", "redpajama_sample.jsonl"),
}


def demo_data_path(*parts: str) -> str:
  return str(resources.files("medllama_jax").joinpath("demo_data", *parts))


def demo_text_path() -> str:
  return demo_data_path("medical_notes.txt")


def train_tokenizer(out_dir: str, vocab_size: int) -> str:
  """A LLaMA-convention SentencePiece model (+ HF tokenizer config) in ``out_dir``."""
  os.makedirs(out_dir)
  sp_model = tokenizer.train_sentencepiece(demo_text_path(), os.path.join(out_dir, "tokenizer"),
                                           vocab_size)
  os.replace(sp_model, os.path.join(out_dir, tokenizer.SENTENCEPIECE_FILE))
  os.remove(os.path.join(out_dir, "tokenizer.vocab"))
  tokenizer.write_hf_tokenizer_config(out_dir)
  return out_dir


def count_corpus_tokens(data_dir: str, tokenizer_dir: str) -> None:
  """``token_stats.json`` in every prepared corpus (``scripts/count_tokens.py``'s work), so the
  mixture's token rates need no counting when training starts."""
  vocabulary = model_vocabulary(tokenizer_dir)
  for corpus in DEMO_CORPORA:
    token_stats.write_token_stats(os.path.join(data_dir, corpus), vocabulary)


def prepare_corpora(data_dir: str) -> dict[str, dict]:
  """Each shipped raw sample → ``data_dir/<corpus>``; returns the preparers' summaries."""
  return {corpus: records.prepare(fmt, [demo_data_path("corpora", sample)],
                                  os.path.join(data_dir, corpus), num_shards=2,
                                  validation_fraction=0.2)
          for corpus, (fmt, sample) in DEMO_CORPORA.items()}


def write_init_model(out_dir: str, config: LlamaConfig, tokenizer_dir: str, mesh: jax.sharding.Mesh,
                     seed: int = 0) -> str:
  """A random LLaMA of ``config`` saved as a model folder (what ``medllama-convert`` writes)."""
  params = partitioning.init_params(Llama(config), mesh, partitioning.logical_axis_rules(),
                                    jax.random.key(seed))
  checkpointing.save_params(os.path.join(out_dir, checkpointing.PARAMS_DIR), params)
  config.save_hf_json(out_dir)
  tokenizer.copy_tokenizer_files(tokenizer_dir, out_dir)
  return out_dir


def demo_model_config() -> LlamaConfig:
  """The model that ``gin/demo/pretrain_demo.gin`` trains."""
  import seqio_tasks.pretrain  # noqa: F401  (registers the pre-training configurables with gin)
  from medllama_jax.train import loop  # noqa: F401  (the trainer's configurables)

  with gin.unlock_config():
    gin_flags.parse_gin([DEMO_GIN], ["RUN_DIR = ''", "DATA_DIR = ''", "INIT_CHECKPOINT = ''"], [])
  config = model_config()
  gin.clear_config()
  return config


def complete_checkpoints(run_dir: str) -> list[int]:
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def _forward_lines(stream, indent: str) -> None:
  """Shows a child command's console lines under the demo's step, as they come."""
  for line in stream:
    print(f"{indent}{line.rstrip()}", flush=True)


def run_training(gin_file: str, run_dir: str, macros: dict[str, str], log_dir: str,
                 kill_after: int | None = None) -> int:
  """``medllama-train`` on a demo recipe, its console shown indented (its log file in
  ``log_dir``); with ``kill_after``, SIGKILL once that step is saved."""
  command = [sys.executable, "-m", "medllama_jax.cli.train", f"--gin_file={gin_file}",
             f"--gin.RUN_DIR='{run_dir}'", *(f"--gin.{k}='{v}'" for k, v in macros.items()),
             f"--log_dir={log_dir}"]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
  forward = threading.Thread(target=_forward_lines, args=(process.stdout, STEP_INDENT),
                             daemon=True)
  forward.start()
  while kill_after is not None and process.poll() is None:
    if any(step >= kill_after for step in complete_checkpoints(run_dir)):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.2)
  status = process.wait()
  forward.join()
  return status


def train_to_end(gin_file: str, run_dir: str, macros: dict[str, str], log_dir: str) -> str:
  """``run_training`` to the last step; the final model folder."""
  status = run_training(gin_file, run_dir, macros, log_dir)
  if status != 0:
    raise RuntimeError(f"medllama-train {gin_file} exited with status {status} (its log file is "
                       f"in {log_dir})")
  return os.path.join(run_dir, "final_model")


def evaluate_on_mibe_samples(model_dir: str, out_dir: str, template: str, max_new_tokens: int
                             ) -> None:
  """``medllama-eval`` on the shipped sample of each of the 12 MIBE datasets and MMLU."""
  import seqio_tasks.mibe
  from medllama_jax.eval import datasets, evaluator

  names = seqio_tasks.mibe.register_mibe_tasks(demo_data_path("mibe"), model_dir,
                                               datasets=[*datasets.MIBE_DATASETS, "mmlu"])
  evaluator.evaluate(model_dir, names, out_dir, max_new_tokens=max_new_tokens,
                     chat_template=template, mesh=EVAL_MESH, length_bucket=EVAL_LENGTH_BUCKET)


def export_and_check(model_dir: str, hf_dir: str, reimport_dir: str, mesh) -> str:
  """HF export; transformers' logits vs ours (if installed); HF → Orbax re-import bit for bit."""
  hf.orbax_to_hf(model_dir, hf_dir, max_shard_bytes=4 * 1024**2)
  hf.hf_to_orbax(hf_dir, reimport_dir)
  ours = loading.load_model(model_dir, mesh)
  again = loading.load_model(reimport_dir, mesh, with_tokenizer=False)
  leaves = list(zip(jax.tree.leaves(ours.params), jax.tree.leaves(again.params)))
  if not all(np.array_equal(a, b) for a, b in leaves):
    raise RuntimeError(f"{reimport_dir}: the HF round trip changed the weights")
  try:
    import torch
    import transformers
  except ImportError:
    return f"{len(leaves)} tensors re-imported bit-identical (transformers not installed)"
  transformers.utils.logging.disable_progress_bar()
  ids = ours.tokenizer.encode(DEMO_PROMPTS[0])
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)(
        torch.tensor([ids])).logits[0].numpy()
  tokens = np.asarray([ids], np.int32)
  logits, _ = ours.model.apply({"params": ours.params}, tokens)
  diff = float(np.max(np.abs(np.asarray(logits[0]) - theirs)))
  return (f"{len(leaves)} tensors re-imported bit-identical; transformers loads it, "
          f"max |logit difference| {diff:.2e}")


@contextlib.contextmanager
def demo_step(number: int, description: str) -> Iterator[None]:
  """One of the demo's steps: announced when it starts, timed when it ends."""
  started = time.perf_counter()
  with progress.stage(f"[{number}/{NUM_STEPS}] {description}"):
    yield
  logging.info("%sdone in %s", STEP_INDENT,
               progress.format_duration(time.perf_counter() - started))


def result(text: str) -> None:
  """A line under the current step: what it wrote or found."""
  logging.info("%s%s", STEP_INDENT, text)


def run_demo(out: str, log_dir: str, max_new_tokens: int, eval_max_new_tokens: int) -> int:
  """The eight steps of the module docstring, into ``out``; child commands log into ``log_dir``.
  ``max_new_tokens``: per generation (step 7); ``eval_max_new_tokens``: per evaluation answer
  (step 8)."""
  started = time.perf_counter()
  config = demo_model_config()
  mesh = partitioning.make_mesh(2, 2, 2)
  logging.info("devices: %d × %s, mesh %s; everything goes under %s", jax.device_count(),
               jax.devices()[0].platform, dict(mesh.shape), out)

  with demo_step(1, f"training a SentencePiece tokenizer ({config.vocab_size} pieces)"):
    tok_dir = train_tokenizer(os.path.join(out, "tokenizer"), config.vocab_size)
    result(tok_dir)

  with demo_step(2, "preparing the shipped PubMed, PMC, MIMIC and RedPajama samples"):
    data_dir = os.path.join(out, "data")
    prepare_corpora(data_dir)
    count_corpus_tokens(data_dir, tok_dir)
    result(data_dir)

  with demo_step(3, f"writing the starting model ({config.num_params():,} random parameters)"):
    init_dir = write_init_model(os.path.join(out, "init_model"), config, tok_dir, mesh)
    result(init_dir)

  run_dir = os.path.join(out, "run")
  macros = {"DATA_DIR": data_dir, "INIT_CHECKPOINT": init_dir}
  with demo_step(4, f"continual pre-training on the 15:1:4 mixture, killed with SIGKILL after "
                    f"step {KILL_AFTER_STEP} is saved, then resumed"):
    killed = run_training(DEMO_GIN, run_dir, macros, log_dir, kill_after=KILL_AFTER_STEP)
    result(f"killed (exit status {killed}) with checkpoints {complete_checkpoints(run_dir)}; "
           "resuming with the same command")
    pretrained_dir = train_to_end(DEMO_GIN, run_dir, macros, log_dir)
    result(f"TensorBoard: {os.path.join(run_dir, 'tensorboard')}")

  chat_run = os.path.join(out, "instruct_run")
  with demo_step(5, "LoRA instruction tuning on the shipped instruction sample"):
    chat_dir = train_to_end(INSTRUCT_GIN, chat_run, {"INIT_CHECKPOINT": pretrained_dir}, log_dir)
    result(f"adapters {os.path.join(chat_run, 'adapters')}, merged model {chat_dir}")

  hf_dir = os.path.join(out, "hf_export")
  with demo_step(6, "exporting the tuned model to a Hugging Face folder"):
    result(export_and_check(chat_dir, hf_dir, os.path.join(out, "reimported"), mesh))
    result(hf_dir)

  with demo_step(7, "greedy generation with the KV cache"):
    sampling = decode.SamplingConfig(max_new_tokens=max_new_tokens)
    for model_dir, prompts, template in ((pretrained_dir, DEMO_PROMPTS, None),
                                         (chat_dir, CHAT_PROMPTS, chat.DEFAULT_TEMPLATE)):
      loaded = loading.load_model(model_dir, mesh)
      tok = loaded.tokenizer
      ids = [generate.encode_prompt(tok, p, template) for p in prompts]
      outputs = decode.generate(loaded.model, loaded.params, ids, sampling, eos_ids=(tok.eos_id,),
                                mesh=mesh, rules=loaded.rules)
      for prompt, generated in zip(prompts, outputs):
        result(f"{'chat ' if template else ''}{prompt!r} → {tok.decode(generated)!r}")

  eval_dir = os.path.join(out, "eval")
  with demo_step(8, f"medllama-eval of the tuned model on the MIBE and MMLU samples (chat "
                    f"template {chat.DEFAULT_TEMPLATE!r})"):
    evaluate_on_mibe_samples(chat_dir, eval_dir, chat.DEFAULT_TEMPLATE, eval_max_new_tokens)
    result(os.path.join(eval_dir, "results.md"))

  logging.info("demo finished in %s. Try:\n"
               "  medllama-generate --model %s --chat --prompt 'What causes anemia?'\n"
               "  tensorboard --logdir %s",
               progress.format_duration(time.perf_counter() - started), chat_dir,
               os.path.join(run_dir, "tensorboard"))
  return 0
