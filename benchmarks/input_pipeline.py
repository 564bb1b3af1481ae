"""Packed tokens/s of the seqio input pipeline, against what one training host would consume.

Why: every training process builds its own batches on its host's CPUs (``data.pipeline``: seqio
reads TFRecords, tokenizes, chunks, mixes 15 : 1 : 4, packs). If that is slower than the chips
behind the host train, the chips wait. This script measures the pipeline's rate on this machine and
sets it beside the rate a host's chips would need, as a headroom ratio (> 1: the pipeline keeps up).

What it measures:

* data: by default the corpus samples shipped with the package, prepared into a temporary folder the
  way the demo does (``demo.prepare_corpora``: ``records.prepare`` per corpus, TFRecord shards and
  ``stats.json``), with a SentencePiece tokenizer trained on the demo text
  (``demo.train_tokenizer``, ``--vocab_size`` pieces, default 1024). ``--data_dir`` (one prepared
  folder per corpus, as ``scripts/prepare_corpus.py`` writes) and ``--vocabulary`` (LLaMA's
  ``tokenizer.model`` or a folder holding it) point it at real corpora instead, and
  ``--task_rates corpus=0,...`` leaves out corpora that are missing;
* the mixture: ``seqio_tasks.pretrain.register_pretrain_mixture`` (biomedical : clinical : general =
  15 : 1 : 4), read with ``data.pipeline.make_data_iterator`` exactly as ``medllama-train`` does
  (train split, shuffled, packed, repeated forever, this process's shard);
* for each sequence length × global batch size: ``first batch (s)`` = building the iterator and
  getting its first batch (graph construction, vocabulary load, shuffle buffers filling); then
  ``--warmup_batches`` untimed batches; then timed ones: at least ``--batches`` and for at least
  ``--min_seconds``, so that batches tf.data prefetched while the first one was being waited for are
  a small part of the count. ``packed tokens/s`` counts every position of the rows (batch × length
  per batch, what the train step processes), ``real tokens/s`` the positions with loss weight > 0
  (document tokens; the rest is padding at row ends), and ``fill`` is real ÷ packed.

The consumer side is not measured here: a host needs ``--chips_per_host`` × tokens/s per chip of the
chosen model. The defaults (``--consumer_tokens_per_s_per_chip``) are a published MaxText figure for
Llama 2 70B on TPU v5p and a rough estimate for 13B; the output says which is which. ``headroom`` =
packed tokens/s ÷ that need. The small demo corpora fit in memory and the demo vocabulary is 1024
pieces, not LLaMA's 32,000, so rates on real corpora (larger files, remote storage, a bigger
tokenizer) can differ: run it with ``--data_dir``/``--vocabulary`` on the training host to know.

  .venv/bin/python benchmarks/input_pipeline.py          # demo corpora, seq 128/512/2048
  .venv/bin/python benchmarks/input_pipeline.py --seq 128,512 --batches 10
  .venv/bin/python benchmarks/input_pipeline.py --data_dir gs://bucket/pretrain_data \\
      --vocabulary gs://bucket/models/llama2-13b --seq 4096 --batch 64 --chips_per_host 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import psutil
import tensorflow as tf
from absl import logging

from medllama_jax import demo
from medllama_jax.cli import console
from medllama_jax.config import PRESETS
from medllama_jax.data.pipeline import make_data_iterator
from medllama_jax.train import throughput
from seqio_tasks.pretrain import ME_LLAMA_GROUP_RATES, register_pretrain_mixture

# Per-chip training tokens/s the defaults assume, and where each figure comes from.
DEFAULT_CONSUMERS = "llama2_70b=692,llama2_13b=2700"
CONSUMER_SOURCES = {
    "llama2_70b": ("published", "MaxText 'Optimized models tiering' (maxtext.readthedocs.io, "
                   "reference/models/tiering): Llama 2 70B on TPU v5p, 512 chips, bf16, SL 4096, "
                   "65.4% MFU, ~692 tokens/s/device"),
    "llama2_13b": ("estimate", "rough scale only, not a published or measured figure: Llama 2 13B "
                   "on TPU v5p at SL 4096 and roughly 50% MFU"),
}
CONSUMER_PEAK_DEVICE = "TPU v5p"
CONSUMER_SEQUENCE_LENGTH = 4096


@dataclasses.dataclass
class Row:
  seq: int
  batch: int
  first_batch_s: float
  batches: int
  elapsed_s: float
  packed_tokens: int
  real_tokens: int

  @property
  def batches_per_s(self) -> float:
    return self.batches / self.elapsed_s

  @property
  def packed_per_s(self) -> float:
    return self.packed_tokens / self.elapsed_s

  @property
  def real_per_s(self) -> float:
    return self.real_tokens / self.elapsed_s

  @property
  def fill(self) -> float:
    return self.real_tokens / max(self.packed_tokens, 1)


@dataclasses.dataclass(frozen=True)
class Consumer:
  name: str
  tokens_per_s_per_chip: float
  kind: str  # "published", "estimate" or "given"
  source: str


def parse_ints(spec: str) -> list[int]:
  return [int(x) for x in spec.split(",") if x.strip()]


def parse_rates(spec: str, flag: str) -> dict[str, float]:
  """``"a=1,b=2.5"`` → ``{"a": 1.0, "b": 2.5}``."""
  out: dict[str, float] = {}
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    name, sep, value = part.partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep:
      raise ValueError(f"{flag} {spec!r}: {part!r} is not NAME=NUMBER")
  return out


def consumers_from(spec: str) -> list[Consumer]:
  defaults = parse_rates(DEFAULT_CONSUMERS, "")
  out = []
  for name, rate in parse_rates(spec, "--consumer_tokens_per_s_per_chip").items():
    if name in CONSUMER_SOURCES and rate == defaults.get(name):
      kind, source = CONSUMER_SOURCES[name]
    else:
      kind, source = "given", "given with --consumer_tokens_per_s_per_chip (not measured here)"
    out.append(Consumer(name, rate, kind, source))
  return out


def implied_mfu(consumer: Consumer) -> float | None:
  """The MFU a per-chip rate implies for the preset of that name on a v5p at SL 4096, or None."""
  config = PRESETS.get(consumer.name)
  peak = dict(throughput.PEAK_BF16_FLOPS).get(CONSUMER_PEAK_DEVICE)
  if config is None or peak is None:
    return None
  flops = throughput.training_flops_per_token(config, CONSUMER_SEQUENCE_LENGTH)
  return consumer.tokens_per_s_per_chip * flops / peak


def measure(mixture: str, seq: int, batch: int, batches: int, warmup_batches: int,
            min_seconds: float, seed: int) -> Row:
  """Times ``make_data_iterator`` batches of ``mixture`` at one length and batch size."""
  start = time.perf_counter()
  iterator = make_data_iterator(mixture, seq, batch, split="train", seed=seed)
  first = next(iterator)
  first_s = time.perf_counter() - start
  expected = (batch, seq)
  if first["decoder_input_tokens"].shape != expected:
    logging.warning("batch shape %s, expected %s (several processes read shards)",
                    first["decoder_input_tokens"].shape, expected)
  for _ in range(warmup_batches):
    next(iterator)
  packed = real = count = 0
  start = time.perf_counter()
  elapsed = 0.0
  while count < batches or elapsed < min_seconds:
    weights = next(iterator)["decoder_loss_weights"]
    packed += weights.size
    real += int(np.count_nonzero(weights > 0))
    count += 1
    elapsed = time.perf_counter() - start
  return Row(seq, batch, first_s, count, elapsed, packed, real)


def _fmt(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def markdown_table(rows: Sequence[Row], consumers: Sequence[Consumer], chips_per_host: int) -> str:
  needs = [chips_per_host * c.tokens_per_s_per_chip for c in consumers]
  head = ["seq", "global batch", "first batch (s)", "timed batches", "batches/s", "packed tokens/s",
          "real tokens/s", "fill"]
  head += [f"headroom vs {c.name} ({_fmt(n)} tok/s/host, {c.kind})"
           for c, n in zip(consumers, needs)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
  for r in rows:
    cells = [str(r.seq), str(r.batch), f"{r.first_batch_s:.2f}", str(r.batches),
             f"{r.batches_per_s:.3g}", _fmt(r.packed_per_s), _fmt(r.real_per_s),
             f"{100 * r.fill:.1f}%"]
    cells += [f"{r.packed_per_s / n:.2f}×" for n in needs]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq", default="128,512,2048", help="comma-separated sequence lengths")
  parser.add_argument("--batch", default="16", help="comma-separated global batch sizes")
  parser.add_argument("--batches", type=int, default=20,
                      help="timed batches per setting (at least)")
  parser.add_argument("--min_seconds", type=float, default=5.0,
                      help="keep timing batches until this many seconds have passed")
  parser.add_argument("--warmup_batches", type=int, default=2,
                      help="untimed batches after the first one")
  parser.add_argument("--data_dir", default=None,
                      help="prepared corpora, one folder per corpus (default: the demo samples, "
                           "prepared into a temporary folder)")
  parser.add_argument("--vocabulary", default=None,
                      help="tokenizer.model or a folder holding it (default: one trained on the "
                           "demo text)")
  parser.add_argument("--vocab_size", type=int, default=1024,
                      help="pieces of the demo tokenizer trained when --vocabulary is not given")
  parser.add_argument("--task_rates", default="",
                      help="corpus=rate overrides of the 15:1:4 mixture, e.g. mimic_iii_notes=0")
  parser.add_argument("--chips_per_host", type=int, default=4,
                      help="accelerator chips fed by one host (TPU v5p: 4)")
  parser.add_argument("--consumer_tokens_per_s_per_chip", default=DEFAULT_CONSUMERS,
                      help="NAME=tokens/s per chip of the trainer to compare with "
                           "(comma-separated)")
  parser.add_argument("--workdir", default=None, help="parent of the temporary folder")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  console.show_project_records_on_stderr()
  if args.batches < 1 or args.warmup_batches < 0 or args.chips_per_host < 1:
    parser.error("--batches and --chips_per_host must be >= 1, --warmup_batches >= 0")
  consumers = consumers_from(args.consumer_tokens_per_s_per_chip)
  task_rates = parse_rates(args.task_rates, "--task_rates") or None
  try:  # the pipeline runs on the host; keep TensorFlow off any accelerator JAX will want
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass

  work = tempfile.mkdtemp(prefix="input_pipeline_", dir=args.workdir)
  try:
    data_dir, vocabulary = args.data_dir, args.vocabulary
    setup = []
    if vocabulary is None:
      start = time.perf_counter()
      vocabulary = demo.train_tokenizer(os.path.join(work, "tokenizer"), args.vocab_size)
      setup.append(f"demo tokenizer ({args.vocab_size} pieces) in "
                   f"{time.perf_counter() - start:.1f} s")
    if data_dir is None:
      start = time.perf_counter()
      data_dir = os.path.join(work, "data")
      summaries = demo.prepare_corpora(data_dir)
      counts = ", ".join(f"{c} {s['records_written'].get('train', 0)}"
                         for c, s in summaries.items())
      setup.append(f"demo corpora prepared in {time.perf_counter() - start:.1f} s (train records: "
                   f"{counts})")
    for line in setup:
      print(line, flush=True)
    mixture = register_pretrain_mixture(data_dir=data_dir, vocabulary_path=vocabulary,
                                        task_rates=task_rates)

    rows: list[Row] = []
    for seq in parse_ints(args.seq):
      for batch in parse_ints(args.batch):
        print(f"seq {seq}, global batch {batch} ...", flush=True)
        row = measure(mixture, seq, batch, args.batches, args.warmup_batches, args.min_seconds,
                      args.seed)
        rows.append(row)
        print(f"  {row.batches_per_s:.3g} batches/s, {row.packed_per_s:,.0f} packed tokens/s, "
              f"fill {100 * row.fill:.1f}%", flush=True)

    cpu = platform.processor() or platform.machine()
    ram = psutil.virtual_memory().total / 2**30
    try:
      load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
      load = "?"
    rates = ", ".join(f"{g} {r:g}" for g, r in ME_LLAMA_GROUP_RATES.items())
    print()
    given_rates = f"; task rates {args.task_rates}" if task_rates else ""
    print(f"Pipeline: mixture {mixture} ({rates}{given_rates}) "
          f"from {args.data_dir or 'the demo corpora (temporary folder)'}, vocabulary "
          f"{args.vocabulary or f'demo SentencePiece, {args.vocab_size} pieces'}; train split, "
          f"shuffled, packed; timed batches: at least {args.batches} and {args.min_seconds:g} s, "
          f"after {args.warmup_batches} warm-up. "
          f"Host: {os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM, load average {load}; "
          f"tensorflow {tf.__version__}.")
    print()
    print(markdown_table(rows, consumers, args.chips_per_host))
    print()
    print(f"headroom = packed tokens/s ÷ (chips per host {args.chips_per_host} × training tokens/s "
          f"per chip): what one host must supply to its chips. The per-chip rates are published or "
          f"estimated figures, NOT measured here:")
    for c in consumers:
      mfu = implied_mfu(c)
      implied = (f"; implies {100 * mfu:.0f}% MFU on a {CONSUMER_PEAK_DEVICE} at SL "
                 f"{CONSUMER_SEQUENCE_LENGTH} by train/throughput.py's FLOP count"
                 if mfu is not None else "")
      print(f"  {c.name}: {c.tokens_per_s_per_chip:,.0f} tokens/s/chip "
            f"({c.kind}: {c.source}{implied})")
    print("Rows are measured at the lengths above; the trainers' figures are at SL "
          f"{CONSUMER_SEQUENCE_LENGTH}. This host's cores may be fewer and shared; a TPU/GPU host "
          "has its own CPUs, and real corpora and LLaMA's 32,000-piece tokenizer cost more per "
          "token than the demo's, so measure on the training host with --data_dir/--vocabulary.")
    return 0
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
