"""Training throughput against MaxText, measured in one run on the same devices, A B A B.

Why: a speed claim means something only beside the reference JAX trainer, measured on the same
machine at the same time. This script trains MaxText's own tiny llama2 configuration (embedding 256,
4 heads x 64, MLP 512, 2 layers, vocabulary 1024, 4 sequences x 512 tokens, float32 weights and
activations, synthetic data, AdamW with gradient clipping) with both trainers and prints tokens/s and
the ratio.

How:

* Each measurement is a fresh process: ours is ``benchmarks/train_throughput.py --json`` (the sharded,
  donated, jit'd train step of ``medllama-train``), MaxText's is its trainer
  (``python -m maxtext.trainers.pre_train.train``, synthetic data, no checkpoints, ``metrics_file``).
  Both get the same environment: the CPU platform and, for N devices, N simulated host devices.
* Rounds alternate the two (ours, MaxText, ours, MaxText, ...), so drift in the machine's load hits
  both alike. A run's figure is the median step time of the steps after ``--warmup_steps`` (compile and
  warm-up excluded); a cell is the median over rounds; the per-round figures are printed too.
* Remat policies are compared pairwise under the same name (both trainers implement ``full`` and
  MaxText's named policies such as ``minimal``; ``none`` is ours alone, MaxText has no such policy).
  On 8 devices the mesh is data 2 x fsdp 2 x tensor 2 for both (MaxText: 0.5 sequences per device).

MaxText needs its own environment (Python >= 3.12, jax >= 0.11.1); ``--maxtext_python`` names its
interpreter (default: ``.maxtext-venv/bin/python`` beside this repository). To build it:

  python3.12 -m venv .maxtext-venv
  .maxtext-venv/bin/pip install --no-deps maxtext==0.2.5
  .maxtext-venv/bin/pip install "jax>=0.11.1" "jaxlib>=0.11.1" "flax>=0.12.9" "optax>=0.2.8" \\
      "orbax-checkpoint>=0.12.4" "grain>=0.2.18" "pathwaysutils>=0.1.11" omegaconf pydantic \\
      tensorboardx "transformers>=5.17.0" sentencepiece tiktoken chex jaxtyping aqtp "qwix>=0.1.8" \\
      "tokamax>=0.0.14,!=0.1.0" "drjax>=0.2.1" ml-collections absl-py numpy jinja2 pillow sympy

(the maxtext 0.2.5 wheel lists its dependencies only under accelerator extras, which pull CUDA or
libtpu; the list above is its base set).

  .venv/bin/python benchmarks/maxtext_peer.py                          # 1 and 8 devices, 2 rounds
  .venv/bin/python benchmarks/maxtext_peer.py --devices 1 --remat minimal --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_SCRIPT = os.path.join(REPO, "benchmarks", "train_throughput.py")
DEFAULT_MAXTEXT_PYTHON = os.path.join(REPO, ".maxtext-venv", "bin", "python")

# MaxText's tiny llama2 shape, spelled for each trainer.
BATCH, SEQ = 4, 512
OUR_MODEL = ["--preset", "tiny", "--override", "hidden_size=256", "--override", "num_heads=4",
             "--override", "num_kv_heads=4", "--override", "head_dim=64",
             "--override", "intermediate_size=512", "--override", "num_layers=2",
             "--override", "vocab_size=1024", "--override", "max_position_embeddings=512",
             "--batch", str(BATCH), "--seq", str(SEQ)]
MAXTEXT_MODEL = ["decoder_block=llama2", "base_emb_dim=256", "base_num_query_heads=4",
                 "base_num_kv_heads=4", "head_dim=64", "base_mlp_dim=512",
                 "base_num_decoder_layers=2", "vocab_size=1024", f"max_target_length={SEQ}",
                 "dtype=float32", "weight_dtype=float32", "attention=dot_product",
                 "dataset_type=synthetic", "enable_checkpointing=false", "enable_dropout=false",
                 "hardware=cpu", "skip_jax_distributed_system=true",
                 "enable_goodput_recording=false", "monitor_goodput=false",
                 "enable_tensorboard=false", "log_config=false", "jax_cache_dir=", "packing=false"]
# Same parallelism for both: every kind at once on 8 devices.
MESHES = {1: (1, 1, 1), 8: (2, 2, 2)}


@dataclasses.dataclass
class Cell:
  """One (devices, remat) comparison: tokens/s of every round, per trainer."""

  devices: int
  remat: str
  ours: list[float] = dataclasses.field(default_factory=list)
  maxtext: list[float] = dataclasses.field(default_factory=list)

  @property
  def ratio(self) -> float | None:
    if not self.ours or not self.maxtext:
      return None
    return statistics.median(self.ours) / statistics.median(self.maxtext)


def environment(devices: int) -> dict[str, str]:
  """The environment both trainers run in: CPU platform, ``devices`` simulated host devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", DECOUPLE_GCLOUD="TRUE", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_ours(devices: int, remat: str, steps: int, warmup: int, workdir: str) -> float:
  """Tokens/s of our train step: the median of ``steps`` steps after ``warmup`` (one process)."""
  out = os.path.join(workdir, "ours.json")
  mesh = "x".join(map(str, MESHES[devices]))
  cmd = [sys.executable, OUR_SCRIPT, *OUR_MODEL, "--override", f"remat_policy={remat}",
         "--mesh", mesh, "--devices", "0", "--steps", str(steps), "--warmup_steps", str(warmup),
         "--json", out]
  _run(cmd, environment(devices), "ours")
  with open(out) as f:
    (row,) = json.load(f)
  if row["skipped"]:
    raise RuntimeError(f"our run was skipped: {row['skipped']}")
  return row["tokens_per_s"]


def run_maxtext(python: str, devices: int, remat: str, steps: int, warmup: int,
                workdir: str) -> float:
  """Tokens/s of MaxText's trainer: the median step time after ``warmup`` steps (one process)."""
  metrics = os.path.join(workdir, "maxtext_metrics.jsonl")
  if os.path.exists(metrics):
    os.remove(metrics)
  data, fsdp, tensor = MESHES[devices]
  cmd = [python, "-m", "maxtext.trainers.pre_train.train", "src/maxtext/configs/base.yml",
         *MAXTEXT_MODEL, f"run_name=peer_{devices}_{remat}",
         f"base_output_directory={os.path.join(workdir, 'maxtext_out')}",
         f"per_device_batch_size={BATCH / devices:g}", f"ici_data_parallelism={data}",
         f"ici_fsdp_parallelism={fsdp}", f"ici_tensor_parallelism={tensor}",
         f"remat_policy={remat}", f"steps={1 + warmup + steps}", f"metrics_file={metrics}"]
  _run(cmd, environment(devices), "maxtext", cwd=workdir)
  with open(metrics) as f:
    records = [json.loads(line) for line in f if line.strip()]
  times = [r["perf/step_time_seconds"] for r in records if r["step"] > warmup]
  if len(times) < steps:
    raise RuntimeError(f"MaxText logged {len(times)} timed steps, expected {steps}")
  return BATCH * SEQ / statistics.median(times)


def _run(cmd: Sequence[str], env: dict[str, str], who: str, cwd: str | None = None) -> None:
  log = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
  if log.returncode:
    tail = "\n".join((log.stdout + log.stderr).splitlines()[-30:])
    raise RuntimeError(f"{who} failed (exit {log.returncode}): {' '.join(cmd)}\n{tail}")


def versions(maxtext_python: str) -> str:
  import jax  # noqa: PLC0415 - only for the report line; the runs are subprocesses

  probe = subprocess.run(
      [maxtext_python, "-c", "import jax, importlib.metadata as m; "
       "print(jax.__version__, m.version('maxtext'))"], capture_output=True, text=True)
  theirs = probe.stdout.split() if probe.returncode == 0 else ["?", "?"]
  return (f"ours: jax {jax.__version__} (Python {sys.version.split()[0]}); MaxText {theirs[1]}: "
          f"jax {theirs[0]}")


def table(cells: Sequence[Cell]) -> str:
  lines = ["| devices (mesh d×f×t) | remat | ours tokens/s | MaxText tokens/s | ours / MaxText "
           "| rounds: ours | rounds: MaxText |", "|---|---|---:|---:|---:|---|---|"]
  for c in cells:
    fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs) or "—"
    med = lambda xs: f"{statistics.median(xs):,.0f}" if xs else "—"
    ratio = "—" if c.ratio is None else f"**{c.ratio:.2f}×**"
    mesh = "×".join(map(str, MESHES[c.devices]))
    lines.append(f"| {c.devices} ({mesh}) | {c.remat} | {med(c.ours)} | {med(c.maxtext)} | {ratio} "
                 f"| {fmt(c.ours)} | {fmt(c.maxtext)} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", default="1,8", help="comma-separated device counts (1, 8)")
  parser.add_argument("--remat", default="minimal,full",
                      help="comma-separated remat policies, each run by both trainers")
  parser.add_argument("--rounds", type=int, default=2, help="A B rounds per cell")
  parser.add_argument("--steps", type=int, default=15, help="timed steps per run")
  parser.add_argument("--warmup_steps", type=int, default=4,
                      help="steps after the first (compiling) one that are not timed")
  parser.add_argument("--maxtext_python", default=os.environ.get("MAXTEXT_PYTHON",
                                                                  DEFAULT_MAXTEXT_PYTHON),
                      help="the interpreter of MaxText's environment (see above)")
  args = parser.parse_args(argv)
  device_counts = [int(d) for d in args.devices.split(",") if d.strip()]
  if any(d not in MESHES for d in device_counts):
    parser.error(f"--devices: each of {sorted(MESHES)}")
  if not os.path.exists(args.maxtext_python):
    print(f"maxtext_peer: no MaxText interpreter at {args.maxtext_python}; build its environment "
          "as this script's docstring says, or pass --maxtext_python", file=sys.stderr)
    return 2

  cells = [Cell(d, r.strip()) for d in device_counts for r in args.remat.split(",") if r.strip()]
  started = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="maxtext_peer_") as workdir:
    for round_index in range(args.rounds):
      for cell in cells:
        for who in ("ours", "maxtext"):
          if who == "ours":
            value = run_ours(cell.devices, cell.remat, args.steps, args.warmup_steps, workdir)
          else:
            value = run_maxtext(args.maxtext_python, cell.devices, cell.remat, args.steps,
                                args.warmup_steps, workdir)
          getattr(cell, who).append(value)
          print(f"round {round_index + 1}/{args.rounds}, {cell.devices} device(s), remat "
                f"{cell.remat}, {who}: {value:,.0f} tokens/s "
                f"({time.perf_counter() - started:.0f} s)", flush=True)
  print()
  print(f"MaxText's tiny llama2 ({BATCH} x {SEQ} tokens per step, float32), CPU, {os.cpu_count()} "
        f"cores; {versions(args.maxtext_python)}. Median of {args.steps} steps after "
        f"{1 + args.warmup_steps} untimed ones per run; median over {args.rounds} alternating rounds.")
  print()
  print(table(cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())
