"""KV-cache decode throughput: ``medllama_jax.decode.generate`` against ``transformers``' ``generate``.

What it measures: greedy generation with a KV cache, on CPU, by the two implementations running the
same float32 weights on the same prompts:

* ours: ``decode.generate`` (prefill plus a ``lax.while_loop`` decode loop, all in one jitted call) on a
  one-device mesh, the model loaded with ``loading.load_model`` from the Hugging Face folder;
* reference: ``transformers.LlamaForCausalLM.generate(do_sample=False, use_cache=True)``, with
  ``torch.set_num_threads`` set to the number of cores XLA's CPU client uses.

The weights are a random ``LlamaForCausalLM`` (``torch.manual_seed``) saved with ``save_pretrained`` to a
temporary folder. Prompts are random token ids of one length (no padding). Neither side can stop early:
our ``eos_ids`` is empty and the reference's generation config has no ``eos_token_id``, so both produce
exactly ``--new_tokens`` ids per row.

For each batch size, each implementation is called once to warm up (for ours that includes tracing and
XLA compilation), then ``--repeats`` times; the table reports the median. ``tokens/s`` is
``batch * new_tokens / median wall time`` and includes the prefill; ``first call extra (s)`` is the
warm-up call's time minus that median (compilation for ours, one-off initialisation for transformers).
Agreement is the share of rows whose greedy ids are identical in both implementations (float32 on both
sides; a near-tie between two logits can still flip one argmax and everything after it).

  .venv/bin/python benchmarks/decode_throughput.py                  # ~134M-param model, batch 1 and 8
  .venv/bin/python benchmarks/decode_throughput.py --preset tiny    # seconds
  .venv/bin/python benchmarks/decode_throughput.py --batch_sizes 1,4,16 --new_tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import psutil
import torch
import transformers

from medllama_jax import decode, loading, partitioning
from medllama_jax.config import LlamaConfig

PRESETS: dict[str, LlamaConfig] = {
    # 134M parameters (85M in the decoder layers, 2 x 24.6M in the untied embedding and LM head).
    "100m": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                        num_heads=12, num_kv_heads=12, max_position_embeddings=2048),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
}


@dataclasses.dataclass
class Row:
  impl: str
  batch: int
  new_tokens: int
  first_call_extra_s: float
  median_s: float
  outputs: list[list[int]]

  @property
  def tokens_per_s(self) -> float:
    return self.batch * self.new_tokens / self.median_s


def build_hf_folder(directory: str, config: LlamaConfig, seed: int, init_range: float
                    ) -> transformers.LlamaForCausalLM:
  """A random float32 ``LlamaForCausalLM`` for ``config``, saved to ``directory``; returns the model."""
  os.makedirs(directory, exist_ok=True)
  config.save_hf_json(directory)
  hf_config = transformers.LlamaConfig.from_pretrained(directory)
  hf_config.initializer_range = init_range
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_config).to(torch.float32).eval()
  model.save_pretrained(directory)
  return model


def timed(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[float, float, list[list[int]]]:
  """(first call s, median of ``repeats`` later calls s, the last call's output)."""
  start = time.perf_counter()
  outputs = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    outputs = fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), outputs


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[float, float]:
  """(% identical rows, % of tokens before each row's first difference)."""
  same_rows = sum(list(x) == list(y) for x, y in zip(a, b))
  prefix = 0
  for x, y in zip(a, b):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
      n += 1
    prefix += n
  total = sum(len(x) for x in a)
  return 100.0 * same_rows / len(a), 100.0 * prefix / max(total, 1)


def markdown_table(rows: Sequence[Row]) -> str:
  lines = ["| impl | batch | new tokens | first call extra (s) | median (s) | tokens/s "
           "| ratio vs transformers |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  reference = {r.batch: r.tokens_per_s for r in rows if r.impl == "transformers"}
  for r in rows:
    ratio = r.tokens_per_s / reference[r.batch] if r.batch in reference else float("nan")
    lines.append(f"| {r.impl} | {r.batch} | {r.new_tokens} | {r.first_call_extra_s:.2f} "
                 f"| {r.median_s:.3f} | {r.tokens_per_s:.1f} | {ratio:.2f} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="100m")
  parser.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: the CPU count, which XLA's CPU client uses)")
  parser.add_argument("--scan_layers", choices=("true", "false"), default="true",
                      help="run our model with nn.scan over layers (the default) or unrolled")
  parser.add_argument("--init_range", type=float, default=0.02,
                      help="std of the random weights (transformers' initializer_range)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
  threads = args.threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  config = PRESETS[args.preset]
  work = tempfile.mkdtemp(prefix="decode_throughput_")
  try:
    hf_dir = os.path.join(work, "hf")
    hf_model = build_hf_folder(hf_dir, config, args.seed, args.init_range)
    hf_model.generation_config.eos_token_id = None  # never stop early
    hf_model.generation_config.pad_token_id = 0
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    loaded = loading.load_model(hf_dir, mesh, with_tokenizer=False, dtype="float32",
                                param_dtype="float32", scan_layers=args.scan_layers == "true")
    params = sum(x.size for x in jax.tree.leaves(loaded.params))
    sampling = decode.SamplingConfig(max_new_tokens=args.new_tokens)
    rng = np.random.default_rng(args.seed)

    rows: list[Row] = []
    agreements: list[tuple[int, float, float]] = []
    for batch in batch_sizes:
      prompts = rng.integers(3, config.vocab_size, size=(batch, args.prompt_len)).tolist()

      def ours() -> list[list[int]]:
        return decode.generate(loaded.model, loaded.params, prompts, sampling, eos_ids=(),
                               pad_id=0, mesh=mesh, rules=loaded.rules)

      input_ids = torch.tensor(prompts, dtype=torch.long)
      attention_mask = torch.ones_like(input_ids)

      def reference() -> list[list[int]]:
        with torch.inference_mode():
          out = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  max_new_tokens=args.new_tokens, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

      for impl, fn in (("medllama_jax", ours), ("transformers", reference)):
        print(f"batch {batch}: {impl} ...", flush=True)
        first, median, outputs = timed(fn, args.repeats)
        if any(len(o) != args.new_tokens for o in outputs):
          raise RuntimeError(f"{impl} produced {[len(o) for o in outputs]} tokens, expected "
                             f"{args.new_tokens} per row")
        rows.append(Row(impl, batch, args.new_tokens, first - median, median, outputs))
      same, prefix = agreement(rows[-2].outputs, rows[-1].outputs)
      agreements.append((batch, same, prefix))

    cpu = platform.processor() or platform.machine()
    ram = psutil.virtual_memory().total / 2**30
    print()
    print(f"Model: preset {args.preset}, {params / 1e6:.0f}M params, float32 (hidden "
          f"{config.hidden_size}, {config.num_layers} layers, MLP {config.intermediate_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} KV heads, vocab {config.vocab_size}); "
          f"prompt {args.prompt_len} tokens, greedy, median of {args.repeats}. Machine: "
          f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; scan_layers={args.scan_layers}.")
    print()
    print(markdown_table(rows))
    print()
    for batch, same, prefix in agreements:
      print(f"greedy agreement, batch {batch}: {same:.0f}% of sequences identical "
            f"({prefix:.0f}% of tokens before the first difference)")
    return 0
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
