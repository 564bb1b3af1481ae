"""Judging and presenting plans: does a variant fit the chip, how fast would it run, side by side.

A variant fits when its peak bytes per device stay within the chip's HBM less a reserve (a fraction
kept free for the runtime, fragmentation and, with the CPU compiler, the estimate's error). Step
time is predicted from the model FLOPs of a step (the trainer's MFU convention) at an assumed MFU:
``flops / (chips x peak x MFU)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from medllama_jax.config import LlamaConfig
from medllama_jax.plan.devices import DESCRIPTIONS
from medllama_jax.plan.planner import PlanResult, TrainSettings
from medllama_jax.plan.topology import GIB, Target, parse_target


@dataclasses.dataclass(frozen=True)
class Fit:
  peak: int
  usable: int
  hbm: int

  @property
  def fits(self) -> bool:
    return self.peak <= self.usable

  @property
  def spare(self) -> int:
    """Usable bytes left over (negative: how much is missing)."""
    return self.usable - self.peak


def check_reserve(reserve: float) -> float:
  if not 0.0 <= reserve < 1.0:
    raise ValueError(f"HBM reserve {reserve} must be in [0, 1)")
  return reserve


def check_mfu(mfu: float) -> float:
  if not 0.0 < mfu <= 1.0:
    raise ValueError(f"MFU {mfu} must be in (0, 1]")
  return mfu


def fit(peak_bytes: int, hbm_bytes: int, reserve: float) -> Fit:
  usable = int(hbm_bytes * (1.0 - check_reserve(reserve)))
  return Fit(peak=peak_bytes, usable=usable, hbm=hbm_bytes)


def step_seconds(flops_per_step: float, target: Target, mfu: float) -> float:
  """Predicted time of one step at model FLOPs utilisation ``mfu`` of the whole slice."""
  return flops_per_step / (target.num_chips * target.chip.peak_bf16_flops * check_mfu(mfu))


def human_bytes(num_bytes: int | None) -> str:
  """GiB with two decimals, or MiB/KiB for what is smaller than a tenth of the unit."""
  if num_bytes is None:
    return "—"
  for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if abs(num_bytes) >= size / 10:
      return f"{num_bytes / size:.2f} {unit}"
  return f"{num_bytes} B"


def human_seconds(seconds: float) -> str:
  return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:.2f} ms"


def _flops(value: float | None) -> str:
  return "n/a (loops)" if value is None else f"{value:.3e}"


Row = tuple[str, Callable[[PlanResult, Target], str]]


def _compiled_bytes(read: Callable[[PlanResult], int]) -> Callable[[PlanResult, Target], str]:
  return lambda r, t: "—" if r.compiled is None else human_bytes(read(r))


def attention_as_compiled(result: PlanResult) -> str:
  """The attention back-end and what the compiler made of it: a kernel, an interpreter, a fallback."""
  if result.compiled is None or result.attention in ("xla", "dot_product"):
    return result.attention
  if result.attention == "splash":
    if result.mosaic_kernels:
      return f"splash: {result.mosaic_kernels} Mosaic kernel calls in the program"
    return "splash: Pallas interpreter (CPU estimate of the kernel)"
  return f"{result.attention}: XLA path in this estimate (cuDNN compiles only for GPU devices)"


def _rows(settings: TrainSettings, reserve: float, mfu: float, with_frozen: bool) -> list[Row]:
  """The comparison's rows: a label and how to read it from a variant and its target."""

  def fits(r: PlanResult, t: Target) -> str:
    if r.compiled is None:
      return f"did not compile: {r.error}"
    f = fit(r.compiled.peak, t.chip.hbm_bytes, reserve)
    return f"yes, {human_bytes(f.spare)} spare" if f.fits else f"NO, {human_bytes(-f.spare)} over"

  def hbm(r: PlanResult, t: Target) -> str:
    usable = fit(0, t.chip.hbm_bytes, reserve).usable
    return f"{human_bytes(t.chip.hbm_bytes)} ({human_bytes(usable)})"

  def timed(show: Callable[[float], str]) -> Callable[[PlanResult, Target], str]:
    return lambda r, t: show(step_seconds(r.model_flops_per_step, t, mfu))

  exact = [("parameters (exact)", lambda r, t: human_bytes(r.params)),
           ("optimizer state (exact)", lambda r, t: human_bytes(r.optimizer))]
  if with_frozen:
    exact.append(("frozen base model of LoRA (exact)", lambda r, t: human_bytes(r.frozen)))
  exact.append(("input batch (exact)", lambda r, t: human_bytes(r.batch)))
  return [
      ("target", lambda r, t: f"{t.spec} ({t.num_chips} x {t.chip.name})"),
      ("mesh data x fsdp x tensor",
       lambda r, t: " x ".join(str(r.mesh.get(a, "?")) for a in ("data", "fsdp", "tensor"))),
      ("remat policy", lambda r, t: r.remat),
      ("attention (as compiled)", lambda r, t: attention_as_compiled(r)),
      ("compiler", lambda r, t: r.compiler),
      *exact,
      ("compiled: arguments", _compiled_bytes(lambda r: r.compiled.argument)),
      ("compiled: outputs not aliased to inputs",
       _compiled_bytes(lambda r: r.compiled.output - r.compiled.alias)),
      ("compiled: temporaries", _compiled_bytes(lambda r: r.compiled.temp)),
      ("- of which the f32 gradient accumulator", _compiled_bytes(lambda r: r.gradients)),
      ("- of which activations and other buffers",
       _compiled_bytes(lambda r: r.activations_and_other)),
      ("compiled: program", _compiled_bytes(lambda r: r.compiled.code)),
      ("**peak per device**", _compiled_bytes(lambda r: r.compiled.peak)),
      (f"HBM per chip (usable, {reserve:.0%} reserved)", hbm),
      ("**fits**", fits),
      ("model FLOPs per step (6N + attention)", lambda r, t: _flops(r.model_flops_per_step)),
      ("compiler FLOPs per step",
       lambda r, t: "—" if r.compiled is None else _flops(r.compiler_flops_per_step)),
      (f"step time at {mfu:.0%} MFU", timed(human_seconds)),
      (f"tokens/s at {mfu:.0%} MFU", timed(lambda s: f"{settings.tokens_per_step / s:,.0f}")),
      ("compile time", lambda r, t: f"{r.compile_seconds:.0f} s"),
  ]


def comparison_table(results: Sequence[PlanResult], settings: TrainSettings, reserve: float,
                     mfu: float) -> str:
  """A Markdown table: one column per variant, one row per quantity (bytes are per device)."""
  targets = [parse_target(r.target) for r in results]
  rows = _rows(settings, reserve, mfu, with_frozen=any(r.frozen for r in results))
  lines = ["| per device | " + " | ".join(f"`{r.label}`" for r in results) + " |",
           "|---|" + "---|" * len(results)]
  for label, read in rows:
    cells = (read(r, t).replace("|", "\\|") for r, t in zip(results, targets))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def describe_run(config: LlamaConfig, settings: TrainSettings) -> str:
  """What is being planned, in one paragraph above the table."""
  lora = (f"; LoRA rank {settings.lora.rank} on {', '.join(settings.lora.targets)} (the base model "
          "frozen)" if settings.lora is not None else "")
  return (f"Model: {config.num_params() / 1e9:.2f}B parameters ({config.num_layers} layers, "
          f"d={config.hidden_size}, {config.num_heads} heads / {config.num_kv_heads} KV heads), "
          f"{config.param_dtype} parameters, {config.dtype} compute, layers "
          f"{'scanned' if config.scan_layers else 'unrolled'}. Step: {settings.global_batch_size} "
          f"sequences x {settings.sequence_length} tokens = {settings.tokens_per_step:,} tokens in "
          f"{settings.num_microbatches} microbatch(es), AdamW{lora}.")


def compiler_notes(results: Sequence[PlanResult]) -> str:
  used = sorted({r.compiler for r in results})
  return "\n".join(f"* `{name}`: {DESCRIPTIONS[name]}." for name in used)
