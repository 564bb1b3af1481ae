"""Throughput of the sharded train step (``medllama_jax.train.step``) on the devices present.

Why: the trainer logs tokens/s and MFU while it runs, but that number mixes the input pipeline, host
to device copies and checkpointing into the step. This script isolates the step itself, for several
model sizes and mesh layouts, so that a change to the model, the partitioning rules or the step
shows up as a number, and so that a layout can be chosen before a long run.

What it measures, for every combination of ``--preset`` × ``--seq`` × ``--batch`` × ``--mesh``:

* the train state is built exactly as ``medllama-train`` builds it (``partitioning.init_params``,
  ``optimizer.make_optimizer``, ``step.train_state_shardings``/``init_train_state``), and the step
  is ``step.jit_train_step(step.make_train_step(...))``: the same sharded, donated, jit'd function;
* the batch is synthetic (random token ids, every loss weight 1, one segment per row) and is placed
  on the devices once, with the step's batch sharding, so host-to-device copies are not timed (the
  input pipeline has its own benchmark, ``benchmarks/input_pipeline.py``);
* the first call traces and compiles the step; ``compile (s)`` is the trace + lowering + XLA compile
  time that JAX reports through ``jax.monitoring`` during that call (the first call's wall time
  minus the median step when JAX reports none, marked ``*``). Then ``--warmup_steps`` untimed steps,
  then ``--steps`` timed ones, each waited for (``jax.block_until_ready`` on the new state and the
  metrics); the table reports the median.

Columns: ``tokens/step`` = global batch × sequence length (every position, as MaxText counts);
``tokens/s`` = tokens/step ÷ median step time; ``model TFLOP/s`` =
``throughput.training_flops_per_token`` × tokens/s (the whole mesh; MaxText's convention, causal
attention counted at half); ``MFU`` = that over the mesh's peak
(``throughput.peak_flops_per_device`` × devices), ``n/a`` where the peak is unknown (CPU).

A mesh is ``DATAxFSDPxTENSOR``; one that uses fewer devices than are present runs on the first ones
(so ``1x1x1`` is the first device alone), one of ``-1`` takes the rest, and one that needs more
devices than are present, or whose data-parallel size does not divide the batch, is skipped with a
note. On a CPU host ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is added before JAX
starts (as the tests do) unless ``XLA_FLAGS`` already sets a device count; ``--devices N`` sets it
to N, ``--devices 0`` leaves ``XLA_FLAGS`` alone. The flag only affects the CPU platform: on a
GPU/TPU host JAX's default devices are the accelerators and the script runs unchanged.

The peer, MaxText, is trained on the same devices by ``benchmarks/maxtext_peer.py``, which runs this
script (``--json``) and MaxText's trainer in turns and prints the ratio.

  .venv/bin/python benchmarks/train_throughput.py         # tiny on 1x1x1, 8x1x1, 2x2x2, 1x2x4
  .venv/bin/python benchmarks/train_throughput.py --mesh 2x2x2 --steps 3 --warmup_steps 1
  .venv/bin/python benchmarks/train_throughput.py --preset small --seq 512 --dtype bfloat16
  .venv/bin/python benchmarks/train_throughput.py --override num_layers=8 --batch 16,32
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_HOST_DEVICES = 8


def configure_host_devices(argv: Sequence[str]) -> str:
  """Sets the CPU device count in ``XLA_FLAGS`` before JAX starts; returns what it did, in words."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--devices", type=int, default=None)
  known, _ = pre.parse_known_args(list(argv))
  flags = os.environ.get("XLA_FLAGS", "")
  if known.devices == 0:
    return "XLA_FLAGS left as set (--devices 0)"
  if known.devices is not None:
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={known.devices}".strip()
    return f"{known.devices} host devices (--devices)"
  if _DEVICE_COUNT_FLAG in flags:
    return "host device count from the XLA_FLAGS already set"
  os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={DEFAULT_HOST_DEVICES}".strip()
  return f"{DEFAULT_HOST_DEVICES} host devices (default)"


_HOST_DEVICES_NOTE = configure_host_devices(sys.argv[1:] if __name__ == "__main__" else [])

import ast  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from absl import logging  # noqa: E402

from medllama_jax import partitioning  # noqa: E402
from medllama_jax.cli import console  # noqa: E402
from medllama_jax.config import PRESETS, LlamaConfig, get_config  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402
from medllama_jax.train import optimizer as optim  # noqa: E402
from medllama_jax.train import step as train_step  # noqa: E402
from medllama_jax.train import throughput  # noqa: E402

DEFAULT_MESHES = "1x1x1,8x1x1,2x2x2,1x2x4"
# What jax.monitoring reports while a jit'd function is traced, lowered and compiled.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass
class Row:
  label: str
  config: LlamaConfig | None
  mesh: tuple[int, ...]
  batch: int
  seq: int
  median_s: float = float("nan")
  compile_s: float = float("nan")
  compile_measured: bool = True
  loss: float = float("nan")
  skipped: str | None = None

  @property
  def devices(self) -> int:
    return math.prod(self.mesh)

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.seq

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_per_step / self.median_s


def parse_meshes(spec: str, num_devices: int) -> list[tuple[int, int, int] | str]:
  """``"1x1x1,2x2x-1"`` → resolved (data, fsdp, tensor) sizes; an unusable one → a reason string."""
  meshes: list[tuple[int, int, int] | str] = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    sizes = part.lower().replace("×", "x").split("x")
    if len(sizes) != 3 or not all(re.fullmatch(r"-?\d+", s) for s in sizes):
      raise ValueError(f"mesh {part!r}: expected DATAxFSDPxTENSOR, e.g. 2x2x2 (one size may be -1)")
    data, fsdp, tensor = (int(s) for s in sizes)
    known = math.prod(s for s in (data, fsdp, tensor) if s != -1)
    if (data, fsdp, tensor).count(-1) > 1 or known < 1 or min(data, fsdp, tensor) < -1:
      raise ValueError(f"mesh {part!r}: sizes must be >= 1, at most one -1")
    if -1 in (data, fsdp, tensor):
      if num_devices % known:
        meshes.append(f"{part}: {num_devices} devices are not divisible by {known}")
        continue
      data, fsdp, tensor = (num_devices // known if s == -1 else s for s in (data, fsdp, tensor))
    if data * fsdp * tensor > num_devices:
      meshes.append(f"{data}x{fsdp}x{tensor}: needs {data * fsdp * tensor} devices, "
                    f"{num_devices} present")
      continue
    meshes.append((data, fsdp, tensor))
  return meshes


def parse_ints(spec: str) -> list[int]:
  return [int(x) for x in spec.split(",") if x.strip()]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """``["num_layers=4", "attention_impl=cudnn"]`` → ``{"num_layers": 4,
  "attention_impl": "cudnn"}``."""
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in fields:
      raise ValueError(f"--override {item!r}: expected FIELD=VALUE with FIELD one of "
                       f"{sorted(fields)}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # a bare string, e.g. attention_impl=cudnn
  return out


def config_label(preset: str, overrides: dict[str, Any], config: LlamaConfig) -> str:
  label = preset + (f"({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
  return f"{label} {config.dtype}/{config.param_dtype}"


def synthetic_batch(config: LlamaConfig, batch: int, seq: int, mesh: jax.sharding.Mesh,
                    rules: partitioning.LogicalRules, seed: int) -> dict[str, jax.Array]:
  """Random rows on the devices, sharded as the step expects (works on several hosts too)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.vocab_size, size=(batch, seq + 1), dtype=np.int32)
  host = {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones((batch, seq), np.float32),
      "decoder_segment_ids": np.ones((batch, seq), np.int32),
      "decoder_positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
  }
  shardings = train_step.batch_shardings(mesh, rules)
  return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
          for k, v in host.items()}


class CompileTimer:
  """Sums the trace/lower/compile durations that ``jax.monitoring`` reports inside the ``with``."""

  def __init__(self) -> None:
    self.seconds = 0.0
    self.events = 0

  def _listen(self, event: str, duration_secs: float, **_: Any) -> None:
    if event in COMPILE_EVENTS:
      self.seconds += duration_secs
      self.events += 1

  def __enter__(self) -> CompileTimer:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc: Any) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


def run_config(row: Row, steps: int, warmup_steps: int, num_microbatches: int, seed: int) -> Row:
  """Builds the state and step for ``row`` and fills in its timings."""
  config = row.config
  mesh = partitioning.make_mesh(*row.mesh, devices=jax.devices()[:row.devices])
  rules = partitioning.logical_axis_rules()
  model = Llama(config)
  tx, _ = optim.make_optimizer(total_steps=1 + warmup_steps + steps)
  shardings = train_step.train_state_shardings(model, tx, mesh, rules)
  params = partitioning.init_params(model, mesh, rules, jax.random.key(seed))
  state = train_step.init_train_state(params, tx, shardings)
  del params  # the state holds them (possibly the same buffers, which the step donates)
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(model, tx, num_microbatches), shardings, mesh, rules)
  batch = synthetic_batch(config, row.batch, row.seq, mesh, rules, seed)
  jax.block_until_ready((state, batch))

  with CompileTimer() as timer:
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - start
  for _ in range(warmup_steps):
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  row.median_s = statistics.median(times)
  row.compile_measured = timer.events > 0
  row.compile_s = timer.seconds if row.compile_measured else first_s - row.median_s
  row.loss = float(metrics["loss"])
  if not bool(metrics["finite"]):
    logging.warning("%s on %s: the last step's loss was not finite", row.label, row.mesh)
  return row


def _fmt_rate(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def markdown_table(rows: Sequence[Row], peak: float | None) -> str:
  lines = ["| config | mesh (data×fsdp×tensor) | batch × seq | tokens/step | step time (ms) "
           "| tokens/s | tokens/s/device | model TFLOP/s | MFU | compile (s) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    mesh = "×".join(map(str, r.mesh)) if r.mesh else "—"
    if r.skipped:
      lines.append(f"| {r.label} | {mesh} | {r.batch} × {r.seq} | {r.tokens_per_step:,} "
                   f"| skipped: {r.skipped} | | | | | |")
      continue
    flops = throughput.training_flops_per_token(r.config, r.seq) * r.tokens_per_s
    utilisation = throughput.mfu(r.config, r.seq, r.tokens_per_s, r.devices, peak)
    mfu = "n/a" if utilisation is None else f"{100 * utilisation:.1f}%"
    compile_s = f"{r.compile_s:.2f}" + ("" if r.compile_measured else "*")
    lines.append(f"| {r.label} | {mesh} | {r.batch} × {r.seq} | {r.tokens_per_step:,} "
                 f"| {1e3 * r.median_s:.1f} | {_fmt_rate(r.tokens_per_s)} "
                 f"| {_fmt_rate(r.tokens_per_s / r.devices)} | {flops / 1e12:.4g} | {mfu} "
                 f"| {compile_s} |")
  return "\n".join(lines)


def write_json(path: str, rows: Sequence[Row]) -> None:
  """The rows as JSON: what ``maxtext_peer.py`` reads back from this script's subprocess."""
  out = [{"label": r.label, "mesh": list(r.mesh), "batch": r.batch, "seq": r.seq,
          "skipped": r.skipped, "median_step_s": None if r.skipped else r.median_s,
          "tokens_per_s": None if r.skipped else r.tokens_per_s,
          "compile_s": None if r.skipped else r.compile_s, "loss": None if r.skipped else r.loss}
         for r in rows]
  with open(path, "w") as f:
    json.dump(out, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tiny",
                      help=f"comma-separated model presets, of {sorted(PRESETS)}")
  parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                      help="LlamaConfig field for every preset (repeatable), e.g. num_layers=4, "
                           "remat_policy=full, attention_impl=cudnn")
  parser.add_argument("--mesh", default=DEFAULT_MESHES,
                      help="comma-separated DATAxFSDPxTENSOR meshes (one size may be -1)")
  parser.add_argument("--batch", default="16", help="comma-separated global batch sizes")
  parser.add_argument("--seq", default="128", help="comma-separated sequence lengths")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--warmup_steps", type=int, default=2,
                      help="untimed steps after the compiling first call")
  parser.add_argument("--dtype", default="float32", help="compute dtype (e.g. bfloat16)")
  parser.add_argument("--param_dtype", default="float32", help="parameter/optimizer dtype")
  parser.add_argument("--num_microbatches", type=int, default=1,
                      help="gradient accumulation inside the step")
  parser.add_argument("--devices", type=int, default=None,
                      help=f"host (CPU) devices to simulate; default {DEFAULT_HOST_DEVICES} unless "
                           "XLA_FLAGS sets a count; 0 leaves XLA_FLAGS alone. Read before JAX "
                           "starts, so only when run as a script")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", dest="json_path", default=None,
                      help="also write every row (step times, tokens/s, loss) to this JSON file")
  args = parser.parse_args(argv)
  console.show_project_records_on_stderr()
  if args.steps < 1 or args.warmup_steps < 0:
    parser.error("--steps must be >= 1 and --warmup_steps >= 0")

  overrides = parse_overrides(args.override)
  presets = [p.strip() for p in args.preset.split(",") if p.strip()]
  num_devices = jax.device_count()
  meshes = parse_meshes(args.mesh, num_devices)
  rows: list[Row] = []
  for preset in presets:
    config = get_config(preset, **{"dtype": args.dtype, "param_dtype": args.param_dtype,
                                   **overrides})
    label = config_label(preset, overrides, config)
    for seq in parse_ints(args.seq):
      for batch in parse_ints(args.batch):
        for mesh in meshes:
          if isinstance(mesh, str):
            rows.append(Row(label, config, (), batch, seq, skipped=mesh))
            continue
          row = Row(label, config, mesh, batch, seq)
          data_parallel = mesh[0] * mesh[1]
          if batch % (data_parallel * args.num_microbatches):
            row.skipped = (f"batch {batch} not divisible by data×fsdp {data_parallel} × "
                           f"{args.num_microbatches} microbatches")
          elif seq > config.max_position_embeddings:
            row.skipped = f"seq {seq} > max_position_embeddings {config.max_position_embeddings}"
          if row.skipped:
            rows.append(row)
            continue
          print(f"{label}, mesh {'x'.join(map(str, mesh))}, batch {batch} × seq {seq} ...",
                flush=True)
          rows.append(run_config(row, args.steps, args.warmup_steps, args.num_microbatches,
                                 args.seed))
          print(f"  {1e3 * row.median_s:.1f} ms/step, {row.tokens_per_s:,.0f} tokens/s, "
                f"compile {row.compile_s:.1f} s, loss {row.loss:.3f}", flush=True)

  device = jax.devices()[0]
  peak = throughput.peak_flops_per_device(device)
  cpu = platform.processor() or platform.machine()
  ram = psutil.virtual_memory().total / 2**30
  print()
  print(f"Devices: {num_devices} × {device.device_kind} ({device.platform}; {_HOST_DEVICES_NOTE}); "
        f"peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s bf16 per device'}. "
        f"Host: {os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM; jax {jax.__version__}.")
  for preset in presets:
    c = get_config(preset, **overrides)
    print(f"Model {preset}: {c.num_params() / 1e6:.3g}M params (hidden {c.hidden_size}, "
          f"{c.num_layers} layers, MLP {c.intermediate_size}, {c.num_heads} heads / "
          f"{c.num_kv_heads} KV heads, vocab {c.vocab_size}, scan_layers={c.scan_layers}, "
          f"remat={c.remat_policy}, attention={c.attention_impl}).")
  print(f"Step: AdamW (make_optimizer defaults), {args.num_microbatches} microbatch(es); synthetic "
        f"batch already on the devices; median of {args.steps} steps after "
        f"{args.warmup_steps} warm-up steps.")
  print()
  print(markdown_table(rows, peak))
  print()
  if any(not r.compile_measured for r in rows if not r.skipped):
    print("* compile time not reported by jax.monitoring: first call minus the median step")
  if peak is None:
    print(f"MFU n/a: no known peak for device kind {device.device_kind!r} "
          "(train/throughput.py PEAK_BF16_FLOPS).")
  if device.platform == "cpu" and num_devices > 1:
    print(f"Note: the {num_devices} CPU devices are simulated on {os.cpu_count()} cores, so meshes "
          "with more devices share the same cores; CPU numbers compare layouts' overheads, "
          "not accelerator speed.")

  if args.json_path:
    write_json(args.json_path, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
