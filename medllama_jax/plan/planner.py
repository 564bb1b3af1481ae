"""Compile the training step of a gin recipe for a target slice on abstract shapes, and measure it.

Everything is built the way ``train.loop.train`` builds it — the gin-configured model, optimizer,
mesh and batch — but from ``ShapeDtypeStruct``s carrying their shardings, so not one weight is
materialised: a 70B plan needs no more host memory than the compiler's. With layers scanned the
compiled program holds one layer's body, which keeps an 80-layer compile affordable.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh

from medllama_jax import partitioning
from medllama_jax.config import LlamaConfig
from medllama_jax.lora import LoraConfig
from medllama_jax.model import Llama
from medllama_jax.plan.devices import COMPILER_OPTIONS
from medllama_jax.plan.memory import CompiledMemory, bytes_per_device
from medllama_jax.plan.topology import Target
from medllama_jax.train import loop, optimizer as optim, step as train_step, throughput

_TRAIN = "medllama_jax.train.loop.train"
_TRAIN_SETTINGS = ("sequence_length", "global_batch_size", "num_microbatches", "total_steps",
                   "z_loss", "lora")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What of ``train.loop.train``'s configuration shapes the compiled step."""

  sequence_length: int
  global_batch_size: int
  num_microbatches: int
  total_steps: int
  z_loss: float
  lora: LoraConfig | None

  @classmethod
  def from_gin(cls) -> "TrainSettings":
    """``train``'s gin bindings over its defaults (references such as ``@LoraConfig()`` evaluated).

    Read one parameter at a time: reading all of ``train``'s bindings at once would evaluate the
    macros naming the run and data folders, which a plan leaves unset.
    """
    defaults = inspect.signature(loop.train).parameters
    values = {}
    for name in _TRAIN_SETTINGS:
      try:
        value = gin.query_parameter(f"{_TRAIN}.{name}")
      except ValueError:  # not bound
        value = defaults[name].default
      if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
      values[name] = value
    return cls(**values)

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch_size * self.sequence_length


@dataclasses.dataclass(frozen=True)
class Variant:
  """One column of a comparison: a mesh, a remat policy and an attention back-end (``None``: gin's)."""

  mesh: dict[str, int] | None = None
  remat: str | None = None
  attention: str | None = None


@dataclasses.dataclass
class PlanResult:
  """One compiled variant. Byte counts are per device; ``error`` is set when it did not compile.

  ``params``, ``optimizer``, ``frozen`` (a LoRA run's base model; 0 without LoRA) and ``batch`` are
  exact, from shapes and shardings (None when the variant failed before they were known);
  ``gradients`` is the float32 gradient accumulator sharded like the trained
  parameters, which the step keeps among its temporaries; ``compiled`` is the compiler's analysis.
  """

  target: str
  mesh: dict[str, int]
  remat: str
  attention: str
  compiler: str
  model_flops_per_step: float
  params: int | None = None
  optimizer: int | None = None
  frozen: int | None = None
  batch: int | None = None
  gradients: int | None = None
  compiled: CompiledMemory | None = None
  # Mosaic (Pallas TPU) kernel calls in the compiled program: splash when the TPU compiler built it
  # (forward, dq and dkv, and the forward again when the remat policy recomputes it).
  mosaic_kernels: int | None = None
  compiler_flops_per_step: float | None = None
  compile_seconds: float = 0.0
  error: str | None = None

  @property
  def label(self) -> str:
    shape = ("x".join(str(self.mesh.get(a, 1)) for a in partitioning.MESH_AXES) if self.mesh
             else "gin mesh")
    return f"{self.target} {shape} {self.remat} {self.attention}"

  @property
  def activations_and_other(self) -> int | None:
    """Temporaries besides the gradient accumulator: saved activations, recomputation, buffers."""
    return None if self.compiled is None else max(self.compiled.temp - self.gradients, 0)

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["label"] = self.label
    out["peak"] = None if self.compiled is None else self.compiled.peak
    return out


def model_flops_per_step(config: LlamaConfig, settings: TrainSettings) -> float:
  """The trainer's MFU convention (``train.throughput``) for one global batch."""
  return (throughput.training_flops_per_token(config, settings.sequence_length)
          * settings.tokens_per_step)


def abstract_batch(settings: TrainSettings, mesh: Mesh,
                   rules: partitioning.LogicalRules) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the data pipeline feeds a step: int32 features, float32 loss weights."""
  shape = (settings.global_batch_size, settings.sequence_length)
  shardings = train_step.batch_shardings(mesh, rules)
  return {key: jax.ShapeDtypeStruct(
      shape, jnp.float32 if key == "decoder_loss_weights" else jnp.int32, sharding=shardings[key])
          for key in train_step.BATCH_KEYS}


def _sharded_abstract(boxed: Any, shardings: Any) -> Any:
  return partitioning.placed(partitioning.unbox(boxed), shardings)


def make_mesh(variant: Variant, devices: list[jax.Device]) -> Mesh:
  """The variant's mesh (or gin's ``make_mesh`` bindings) over exactly the target's devices."""
  sizes = {} if variant.mesh is None else dict(variant.mesh)
  mesh = partitioning.make_mesh(**sizes, devices=devices)
  if mesh.devices.size != len(devices):
    raise ValueError(f"mesh {dict(mesh.shape)} uses {mesh.devices.size} devices but the target has "
                     f"{len(devices)} chips; size the mesh to the slice (-1 takes the rest)")
  return mesh


def plan_variant(config: LlamaConfig, settings: TrainSettings, variant: Variant, target: Target,
                 compiler: str, devices: list[jax.Device]) -> PlanResult:
  """Lowers and compiles the train step of ``variant`` for ``target``'s ``devices`` (simulated or
  compile-only); nothing is allocated. A variant that cannot be built or compiled (a mesh the slice
  cannot hold, a batch the mesh cannot split, a program over the TPU's memory) comes back with
  ``error`` set, so one bad column does not stop a comparison."""
  if variant.remat is not None:
    config = config.replace(remat_policy=variant.remat)
  if variant.attention is not None:
    config = config.replace(attention_impl=variant.attention)
  result = PlanResult(target=target.spec, mesh=dict(variant.mesh or {}),
                      remat=config.remat_policy, attention=config.attention_impl, compiler=compiler,
                      model_flops_per_step=model_flops_per_step(config, settings))
  start = time.perf_counter()
  try:
    compiled = _compile(config, settings, variant, devices, result)
  except (ValueError, jax.errors.JaxRuntimeError) as e:
    result.error = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    logging.warning("%s did not compile: %s", result.label, result.error)
    return result
  finally:
    result.compile_seconds = time.perf_counter() - start
  result.compiled = CompiledMemory.of(compiled)
  result.mosaic_kernels = mosaic_kernel_count(compiled)
  result.compiler_flops_per_step = _compiler_flops(compiled, len(devices))
  logging.info("%s compiled in %.0f s: %.2f GiB per device at peak", result.label,
               result.compile_seconds, result.compiled.peak / 1024**3)
  return result


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What the jit'd step is lowered with, as ``train`` builds it, all abstract and sharded."""

  model: Llama
  optimizer: optax.GradientTransformation
  state_shardings: train_step.TrainState
  state: train_step.TrainState
  frozen: Any | None
  batch: dict[str, jax.ShapeDtypeStruct]


def step_inputs(config: LlamaConfig, settings: TrainSettings, mesh: Mesh,
                rules: partitioning.LogicalRules) -> StepInputs:
  model = Llama(config, lora=settings.lora)
  tx, _ = optim.make_optimizer(total_steps=settings.total_steps)
  state_shardings = train_step.train_state_shardings(model, tx, mesh, rules)
  state = _sharded_abstract(train_step.abstract_train_state(model, tx), state_shardings)
  frozen = None
  if settings.lora is not None:
    base = Llama(config)
    frozen = _sharded_abstract(partitioning.abstract_params(base),
                               partitioning.param_shardings(base, mesh, rules))
  return StepInputs(model, tx, state_shardings, state, frozen,
                    abstract_batch(settings, mesh, rules))


def exact_bytes(inputs: StepInputs) -> dict[str, int]:
  """Bytes per device that shapes and shardings determine: the train state, a LoRA run's frozen
  base, the batch, and the float32 gradient accumulator (sharded like the trained parameters)."""
  state = inputs.state
  gradients = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), state.params)
  return {"params": bytes_per_device(state.params),
          "optimizer": bytes_per_device((state.step, state.opt_state)),
          "frozen": 0 if inputs.frozen is None else bytes_per_device(inputs.frozen),
          "batch": bytes_per_device(inputs.batch),
          "gradients": bytes_per_device(gradients)}


def _compile(config: LlamaConfig, settings: TrainSettings, variant: Variant,
             devices: list[jax.Device], result: PlanResult) -> jax.stages.Compiled:
  """Builds the step's inputs as ``train`` would, records their exact bytes in ``result``, and
  compiles the step."""
  rules = partitioning.logical_axis_rules()
  mesh = make_mesh(variant, devices)
  result.mesh = dict(mesh.shape)
  inputs = step_inputs(config, settings, mesh, rules)
  for name, value in exact_bytes(inputs).items():
    setattr(result, name, value)
  step = train_step.sharded_train_step(
      train_step.make_train_step(inputs.model, inputs.optimizer, settings.num_microbatches,
                                 settings.z_loss),
      inputs.state_shardings, mesh, rules,
      None if inputs.frozen is None else jax.tree.map(lambda x: x.sharding, inputs.frozen))
  logging.info("compiling the train step of %s (%s compiler, %d devices)", result.label,
               result.compiler, len(devices))
  with partitioning.activate(mesh, rules):
    lowered = step.lower(inputs.state, inputs.batch, inputs.frozen)
  return lowered.compile(compiler_options=COMPILER_OPTIONS[result.compiler] or None)


def mosaic_kernel_count(compiled: jax.stages.Compiled) -> int:
  """Mosaic kernels (Pallas on TPU: splash attention) called by a compiled program; a loop body
  (the scanned layers) is counted once. Interpreted Pallas, on other compilers, leaves none."""
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def _compiler_flops(compiled: jax.stages.Compiled, num_devices: int) -> float | None:
  """The compiler's FLOP count of the whole step, or None when it cannot be trusted.

  XLA's cost analysis counts the body of a loop once, whatever its trip count, so a program with
  loops (scanned layers, accumulated microbatches) is undercounted; only a loop-free program's
  count is returned.
  """
  if " while(" in compiled.as_text():
    return None
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, list) else costs
  flops = (costs or {}).get("flops")
  return None if flops is None else float(flops) * num_devices

