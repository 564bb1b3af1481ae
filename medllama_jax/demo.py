"""The embedded default job: Me-LLaMA's continual pre-training cycle, end to end, small, on CPU.

  python -m medllama_jax.demo --out demo_output

Runs in a few minutes on 8 simulated CPU devices (a data × fsdp × tensor = 2 × 2 × 2 mesh). Steps, each
printed with where it wrote:
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

import argparse  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from importlib import resources  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from medllama_jax import (chat, checkpointing, decode, generate_cli, loading, logs,  # noqa: E402
                          partitioning, tokenizer)
from medllama_jax.config import LlamaConfig, model_config  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.data import records  # noqa: E402
from medllama_jax.eval import cli as eval_cli  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

DEMO_PROMPTS = ("The patient presented with", "Metformin is a first-line treatment for")
DEMO_GIN = "demo/pretrain_demo.gin"
INSTRUCT_GIN = "demo/instruct_demo.gin"
CHAT_PROMPTS = ("What is metformin used for?",)
KILL_AFTER_STEP = 20
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
  tokenizer.write_hf_tokenizer_config(out_dir, tokenizer.load_tokenizer(out_dir))
  return out_dir


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
  from medllama_jax.train import cli  # The trainer's gin search path; imports seqio_tasks.
  with gin.unlock_config():
    cli.parse_gin([DEMO_GIN], ["RUN_DIR = ''", "DATA_DIR = ''", "INIT_CHECKPOINT = ''"], [])
  config = model_config()
  gin.clear_config()
  return config


def complete_checkpoints(run_dir: str) -> list[int]:
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def train_log(run_dir: str) -> str:
  """Where ``run_training`` appends the trainer's output: beside the run folder, for all runs."""
  return os.path.join(os.path.dirname(run_dir), "train.log")


def run_training(gin_file: str, run_dir: str, macros: dict[str, str],
                 kill_after: int | None = None) -> int:
  """``medllama-train`` on a demo recipe; with ``kill_after``, SIGKILL once that step is saved."""
  command = [sys.executable, "-m", "medllama_jax.train.cli", f"--gin_file={gin_file}",
             f"--gin.RUN_DIR='{run_dir}'", *(f"--gin.{k}='{v}'" for k, v in macros.items())]
  with open(train_log(run_dir), "a") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while kill_after is not None and process.poll() is None:
      if any(step >= kill_after for step in complete_checkpoints(run_dir)):
        process.send_signal(signal.SIGKILL)
        break
      time.sleep(0.2)
    return process.wait()


def train_to_end(gin_file: str, run_dir: str, macros: dict[str, str], what: str) -> str | None:
  """``run_training`` to the last step; the final model folder, or None (after saying where the
  log is) when the run failed."""
  if run_training(gin_file, run_dir, macros) != 0:
    print(f"{what} failed: see {train_log(run_dir)}", file=sys.stderr)
    return None
  return os.path.join(run_dir, "final_model")


def evaluate_on_mibe_samples(model_dir: str, out_dir: str, template: str,
                             max_new_tokens: int) -> int:
  """``medllama-eval`` on the shipped sample of each of the 12 MIBE datasets and MMLU."""
  return eval_cli.main(["--model", model_dir, "--data_dir", demo_data_path("mibe"), "--out",
                        out_dir, "--tasks", "all,mmlu", "--chat_template", template,
                        "--max_new_tokens", str(max_new_tokens), "--mesh", EVAL_MESH,
                        "--length_bucket", str(EVAL_LENGTH_BUCKET)])


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
  ids = ours.tokenizer.encode(DEMO_PROMPTS[0])
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)(
        torch.tensor([ids])).logits[0].numpy()
  tokens = np.asarray([ids], np.int32)
  logits, _ = ours.model.apply({"params": ours.params}, tokens)
  diff = float(np.max(np.abs(np.asarray(logits[0]) - theirs)))
  return (f"{len(leaves)} tensors re-imported bit-identical; transformers loads it, "
          f"max |logit difference| {diff:.2e}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medllama_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
  parser.add_argument("--max_new_tokens", type=int, default=24, help="per generation (step 7)")
  parser.add_argument("--eval_max_new_tokens", type=int, default=8,
                      help="per evaluation answer (step 8)")
  args = parser.parse_args(argv)
  logs.setup()
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out)
  config = demo_model_config()
  mesh = partitioning.make_mesh(2, 2, 2)
  print(f"devices: {jax.device_count()} × {jax.devices()[0].platform}, mesh {dict(mesh.shape)}")

  tok_dir = train_tokenizer(os.path.join(out, "tokenizer"), config.vocab_size)
  print(f"[1/8] SentencePiece tokenizer ({config.vocab_size} pieces): {tok_dir}")

  data_dir = os.path.join(out, "data")
  summaries = prepare_corpora(data_dir)
  counts = ", ".join(f"{c} {s['records_written'].get('train', 0)}+"
                     f"{s['records_written'].get('validation', 0)}" for c, s in summaries.items())
  print(f"[2/8] prepared corpora (train+validation records: {counts}): {data_dir}")

  init_dir = write_init_model(os.path.join(out, "init_model"), config, tok_dir, mesh)
  print(f"[3/8] starting model folder (random, {config.num_params():,} parameters): {init_dir}")

  run_dir = os.path.join(out, "run")
  macros = {"DATA_DIR": data_dir, "INIT_CHECKPOINT": init_dir}
  killed = run_training(DEMO_GIN, run_dir, macros, kill_after=KILL_AFTER_STEP)
  saved = complete_checkpoints(run_dir)
  print(f"      training killed with SIGKILL (exit {killed}) with checkpoints {saved}; resuming")
  pretrained_dir = train_to_end(DEMO_GIN, run_dir, macros, "training")
  if pretrained_dir is None:
    return 1
  print(f"[4/8] continual pre-training (log {os.path.join(out, 'train.log')}, TensorBoard "
        f"{os.path.join(run_dir, 'tensorboard')}): {pretrained_dir}")

  chat_run = os.path.join(out, "instruct_run")
  chat_dir = train_to_end(INSTRUCT_GIN, chat_run, {"INIT_CHECKPOINT": pretrained_dir},
                          "instruction tuning")
  if chat_dir is None:
    return 1
  print(f"[5/8] LoRA instruction tuning (adapters {os.path.join(chat_run, 'adapters')}), "
        f"merged: {chat_dir}")

  hf_dir = os.path.join(out, "hf_export")
  check = export_and_check(chat_dir, hf_dir, os.path.join(out, "reimported"), mesh)
  print(f"[6/8] Hugging Face export ({check}): {hf_dir}")

  print("[7/8] greedy generation with the KV cache:")
  sampling = decode.SamplingConfig(max_new_tokens=args.max_new_tokens)
  for model_dir, prompts, template in ((pretrained_dir, DEMO_PROMPTS, None),
                                       (chat_dir, CHAT_PROMPTS, chat.DEFAULT_TEMPLATE)):
    loaded = loading.load_model(model_dir, mesh)
    tok = loaded.tokenizer
    ids = [generate_cli.encode_prompt(tok, p, template) for p in prompts]
    outputs = decode.generate(loaded.model, loaded.params, ids, sampling, eos_ids=(tok.eos_id,),
                              mesh=mesh, rules=loaded.rules)
    for prompt, generated in zip(prompts, outputs):
      print(f"      {'chat ' if template else ''}{prompt!r} → {tok.decode(generated)!r}")

  eval_dir = os.path.join(out, "eval")
  if evaluate_on_mibe_samples(chat_dir, eval_dir, chat.DEFAULT_TEMPLATE,
                              args.eval_max_new_tokens) != 0:
    print(f"evaluation failed: see the log above and {eval_dir}", file=sys.stderr)
    return 1
  print(f"[8/8] medllama-eval of the tuned model on the MIBE and MMLU samples (chat template "
        f"{chat.DEFAULT_TEMPLATE!r}): {os.path.join(eval_dir, 'results.md')}")
  logging.info("demo finished")
  print(f"\nEverything is under {out}. Try:\n"
        f"  medllama-generate --model {chat_dir} --chat --prompt 'What causes anemia?' --json\n"
        f"  tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
