"""Wall time and peak host memory of ``medllama-convert`` on a multi-GB checkpoint.

What it measures: the converters claim to stream (one tensor in memory at a time), so their peak
resident memory should stay near the largest tensor, not the model size. This script

  1. writes a random LLaMA Hugging Face folder (``config.json`` + safetensors shards + index) of the
     chosen size, one tensor at a time with ``SafetensorsWriter`` so that this process never holds the
     model either (names and shapes come from ``convert.hf.tensor_rules``);
  2. runs ``medllama-convert hf-to-orbax`` and then ``orbax-to-hf`` on it, each as a subprocess
     (``python -m medllama_jax.cli.convert``), timing it and sampling the resident set size (RSS) of the
     child and all its descendants every 50 ms with psutil (the "peak RSS" column). The kernel's own
     high-water mark, ``VmHWM`` from ``/proc/PID/status`` (summed over the processes, as last read before
     exit), is printed alongside: it catches spikes shorter than the sampling interval. The rusage
     ``ru_maxrss`` of a child is no use here: Linux carries it across ``fork``+``exec``, so it starts at
     this (large, JAX-importing) parent's RSS;
  3. spot-checks that the exported safetensors hold exactly the original bytes for a sample of tensors.

It prints a Markdown table: step, model size on disk (the safetensors folder), parameters, wall time,
peak RSS, and peak RSS divided by the model size. A first row runs a child that only imports the
converter's modules and starts JAX's CPU client: the fixed cost under every conversion. Nothing here is a unit test; it is meant to be run by hand:

  .venv/bin/python benchmarks/convert_memory.py                    # default: ~1.3B params, bf16, 2.6 GB
  .venv/bin/python benchmarks/convert_memory.py --preset small     # ~60M params, a quick run
  .venv/bin/python benchmarks/convert_memory.py --workdir /big/disk --keep

The working folder (three copies of the model) is a fresh temporary directory under ``--workdir``
(default: the system temp dir) and is deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import psutil

from medllama_jax.config import LlamaConfig
from medllama_jax.convert.hf import tensor_rules
from medllama_jax.convert.safetensors_io import SafetensorsReader, SafetensorsWriter

# Architectures: ``1b`` is TinyLlama-1.1B (hidden 2048, MLP 5632, 16 heads / 4 KV heads, vocab 32000)
# deepened from 22 to 26 layers, which makes 1.30B parameters (2.6 GB in bfloat16).
PRESETS: dict[str, LlamaConfig] = {
    "1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=26,
                      num_heads=16, num_kv_heads=4, max_position_embeddings=2048),
    "tinyllama": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_layers=22, num_heads=16, num_kv_heads=4,
                             max_position_embeddings=2048),
    "small": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
                         num_heads=8, num_kv_heads=8, max_position_embeddings=2048),
}
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}
GB = 1e9
# What every conversion pays before touching a tensor: the interpreter, the imports, JAX's CPU client.
BASELINE_STEP = "baseline (imports only)"
BASELINE_CODE = ("import jax, orbax.checkpoint, medllama_jax.cli.convert, medllama_jax.checkpointing; "
                 "jax.devices()")


@dataclasses.dataclass
class StepResult:
  step: str
  wall_s: float
  peak_rss: int  # psutil samples, child + descendants
  kernel_hwm: int  # sum over processes of /proc/PID/status VmHWM, last value seen
  samples: int


def dir_size(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      total += os.path.getsize(os.path.join(root, name))
  return total


def write_random_hf_folder(directory: str, config: LlamaConfig, dtype: np.dtype,
                           max_shard_bytes: int, seed: int) -> int:
  """A HF LLaMA folder of random weights, written one tensor at a time; returns the parameter count."""
  os.makedirs(directory)
  config.replace(param_dtype=dtype.name).save_hf_json(directory)
  rules = tensor_rules(config)
  shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
  size = 0
  for rule in rules:
    nbytes = int(np.prod(rule.hf_shape)) * dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((rule.hf_name, dtype, rule.hf_shape))
    size += nbytes
  rng = np.random.default_rng(seed)
  weight_map, total_bytes, params = {}, 0, 0
  for index, shard in enumerate(shards, 1):
    filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
    with SafetensorsWriter(os.path.join(directory, filename), shard, {"format": "pt"}) as writer:
      for name, _, shape in shard:
        if len(shape) == 1:  # RMSNorm scales
          array = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        else:
          array = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        writer.write(name, array)
        weight_map[name] = filename
        total_bytes += array.nbytes
        params += array.size
        del array
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
  return params


def _vm_hwm(pid: int) -> int | None:
  """The kernel's resident-set high-water mark of ``pid`` (``VmHWM``; reset by exec), in bytes."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def run_measured(step: str, argv: list[str], log_path: str,
                 interval_s: float = 0.05) -> StepResult:
  """Runs ``argv`` as a child process, sampling the RSS of it and its descendants every ``interval_s``."""
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
  peak, samples = 0, 0
  hwm: dict[int, int] = {}
  stop = threading.Event()

  def sample() -> None:
    nonlocal peak, samples
    try:
      parent = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
      return
    while not stop.is_set():
      try:
        procs = [parent] + parent.children(recursive=True)
      except psutil.NoSuchProcess:
        return
      rss = 0
      for p in procs:
        try:
          rss += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
          continue
        value = _vm_hwm(p.pid)
        if value is not None:
          hwm[p.pid] = max(hwm.get(p.pid, 0), value)
      peak, samples = max(peak, rss), samples + 1
      stop.wait(interval_s)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  returncode = proc.wait()
  wall = time.perf_counter() - start
  stop.set()
  sampler.join()
  if returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-4000:]
    raise RuntimeError(f"{step} failed with exit code {returncode}; log {log_path}:\n{tail}")
  return StepResult(step, wall, peak, sum(hwm.values()), samples)


def spot_check(original_dir: str, exported_dir: str, count: int, seed: int) -> tuple[int, list[str]]:
  """Compares ``count`` sampled tensors (every tensor if ``count < 0``); returns (checked, mismatches)."""

  def weight_map(directory: str) -> dict[str, str]:
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
      return json.load(f)["weight_map"]

  before, after = weight_map(original_dir), weight_map(exported_dir)
  names = sorted(before)
  if set(after) != set(before):
    return 0, [f"tensor sets differ: missing {sorted(set(before) - set(after))[:5]}, "
               f"extra {sorted(set(after) - set(before))[:5]}"]
  if 0 <= count < len(names):
    # Always include the largest tensors (embedding, lm_head) plus a random sample of the rest.
    fixed = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in before]
    rest = [n for n in names if n not in fixed]
    names = fixed + random.Random(seed).sample(rest, max(0, count - len(fixed)))
  mismatches = []
  for name in names:
    with SafetensorsReader(os.path.join(original_dir, before[name])) as a, \
         SafetensorsReader(os.path.join(exported_dir, after[name])) as b:
      x, y = a.read(name), b.read(name)
      same = x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
          x.view(np.uint8), y.view(np.uint8))
      if not same:
        mismatches.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
  return len(names), mismatches


def markdown_table(results: Sequence[StepResult], model_bytes: int, params: int) -> str:
  lines = ["| step | model size on disk (GB) | params (B) | wall time (s) | peak RSS (GB) "
           "| peak RSS / model size | VmHWM (GB) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r.step} | {model_bytes / GB:.2f} | {params / 1e9:.2f} | {r.wall_s:.1f} "
                 f"| {r.peak_rss / GB:.2f} | {r.peak_rss / model_bytes:.2f} "
                 f"| {r.kernel_hwm / GB:.2f} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="1b",
                      help="model architecture (default 1b: 1.30B params)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                      help="stored dtype of the random checkpoint")
  parser.add_argument("--shard_size_mb", type=int, default=1000,
                      help="safetensors shard size of the generated folder and of the export")
  parser.add_argument("--workdir", default=None,
                      help="parent of the temporary working folder (default: system temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the working folder")
  parser.add_argument("--verify_tensors", type=int, default=8,
                      help="tensors to compare after the round trip (-1: all)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  config = PRESETS[args.preset]
  dtype = DTYPES[args.dtype]
  largest = max(int(np.prod(r.hf_shape)) for r in tensor_rules(config)) * dtype.itemsize
  work = tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir)
  hf_dir, orbax_dir, export_dir = (os.path.join(work, n) for n in ("hf", "orbax", "hf_export"))
  cli = [sys.executable, "-m", "medllama_jax.cli.convert"]
  shard_arg = f"{args.shard_size_mb}MB"
  try:
    print(f"working folder: {work}", flush=True)
    start = time.perf_counter()
    params = write_random_hf_folder(hf_dir, config, dtype, args.shard_size_mb * 1024**2, args.seed)
    print(f"wrote a random {args.preset} checkpoint: {params / 1e9:.3f}B params, "
          f"{dir_size(hf_dir) / GB:.2f} GB in {time.perf_counter() - start:.1f} s", flush=True)
    model_bytes = dir_size(hf_dir)
    results = []
    for step, child_argv in (
        (BASELINE_STEP, [sys.executable, "-c", BASELINE_CODE]),
        ("hf-to-orbax", cli + ["hf-to-orbax", "--hf_dir", hf_dir, "--out", orbax_dir]),
        ("orbax-to-hf", cli + ["orbax-to-hf", "--ckpt", orbax_dir, "--out", export_dir,
                               "--max_shard_size", shard_arg])):
      print(f"running {step} ...", flush=True)
      result = run_measured(step, child_argv, os.path.join(work, f"{step.split()[0]}.log"))
      print(f"  {result.wall_s:.1f} s, peak RSS {result.peak_rss / GB:.2f} GB "
            f"({result.samples} samples)", flush=True)
      results.append(result)
    checked, mismatches = spot_check(hf_dir, export_dir, args.verify_tensors, args.seed)

    cpu = platform.processor() or platform.machine()
    ram = psutil.virtual_memory().total / 2**30
    print()
    print(f"Model: preset {args.preset} (hidden {config.hidden_size}, {config.num_layers} layers, "
          f"MLP {config.intermediate_size}, {config.num_heads} heads / {config.num_kv_heads} KV "
          f"heads, vocab {config.vocab_size}), {args.dtype}; largest tensor {largest / 1e6:.0f} MB. "
          f"Machine: {os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM.")
    print()
    print(markdown_table(results, model_bytes, params))
    print()
    print(f"model size = the generated safetensors folder; the Orbax folder is "
          f"{dir_size(orbax_dir) / GB:.2f} GB (compressed), the export {dir_size(export_dir) / GB:.2f} GB")
    if mismatches:
      print(f"round trip: {len(mismatches)} of {checked} checked tensors DIFFER:")
      for line in mismatches:
        print(f"  {line}")
      return 1
    print(f"round trip: {checked} checked tensors are byte-identical to the originals")
    return 0
  finally:
    if args.keep:
      print(f"kept {work}")
    else:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
