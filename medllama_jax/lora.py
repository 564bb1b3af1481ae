"""LoRA: low-rank adapters on the decoder's projections, trained while the base model stays frozen.

A targeted projection ``y = x W`` becomes ``y = x W + scale * dropout(x) A B`` with ``scale = alpha /
rank``. ``A`` maps the weight's input dimensions to ``rank`` and ``B`` maps ``rank`` to its output
dimensions, so an einsum weight such as ``o_proj [heads, head_dim, d]`` gets ``A [heads, head_dim, rank]``
and ``B [rank, d]``, and ``A @ B`` has the weight's own shape: merging is ``W + scale * A @ B``, no
reshape. The adapters carry the base weight's logical axis names on the dimensions they share with it
(``A`` over the input dimensions, ``B`` over the output ones), so they shard like the weight; the rank
axis is left unsharded. ``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh adapter changes
nothing.

Each adapter is a child module next to its weight (``self_attn/q_proj_lora/{a,b}``, stacked over
layers like everything else when the model scans): a child draws its init from its own rng sequence, so
the base weights of a LoRA model get the same random init as the plain model's. ``split``/``join``
separate and recombine the frozen base and the trainable adapters. Adapters are always float32,
whatever the base's dtype: they are a tiny fraction of the parameters, and Adam's small updates would
vanish in bfloat16 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from medllama_jax import partitioning
from medllama_jax.checkpointing import ParamPath, flatten, nest

Array = jax.Array

# Every projection LoRA can adapt, with the number of leading input dimensions of its weight (the rest
# are output dimensions): ``o_proj [heads, head_dim, d]`` reads two, every other weight one.
INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
              "down_proj": 1}
ADAPTER_SUFFIX = "_lora"  # The adapter of ``q_proj`` is the module ``q_proj_lora``.
# No partitioning rule names it, so it resolves to "replicated" under any rules.
RANK_AXIS = "lora_rank"
CONFIG_FILE = "lora_config.json"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, ``alpha`` (the update is scaled by ``alpha / rank``), dropout on the adapters' input while
  training, and which projections to adapt (any of ``INPUT_DIMS``)."""

  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.05
  targets: tuple[str, ...] = tuple(INPUT_DIMS)

  def __post_init__(self):
    # Hashable (gin and JSON give lists), like LlamaConfig, so it can be a Flax module attribute.
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = sorted(set(self.targets) - set(INPUT_DIMS))
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"LoRA targets {self.targets} must be distinct names from {tuple(INPUT_DIMS)}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank={self.rank} must be >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def save_json(self, directory: str, base_model: str | None) -> str:
    """Writes ``lora_config.json``: this config and ``base_model``, the folder the adapters belong to."""
    path = epath.Path(directory) / CONFIG_FILE
    path.write_text(json.dumps({**dataclasses.asdict(self), "base_model": base_model}, indent=2,
                               sort_keys=True))
    return os.fspath(path)

  @classmethod
  def load_json(cls, directory: str) -> "LoraConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in _read_config_file(directory).items() if k in fields})


def recorded_base_model(directory: str) -> str | None:
  """The base model folder an adapter folder was trained on, as its ``lora_config.json`` records it."""
  return _read_config_file(directory).get("base_model")


def _read_config_file(directory: str) -> dict[str, Any]:
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} in the adapter folder {directory}")
  return json.loads(path.read_text())


def _a_init(input_dims: int) -> nn.initializers.Initializer:
  """PEFT's ``kaiming_uniform_(a=sqrt(5))``: uniform in ``±1/sqrt(fan_in)``, fan-in over the input dims."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                          in_axis=tuple(range(input_dims)), out_axis=-1)


class Adapter(nn.Module):
  """``scale * dropout(x) A B``, the low-rank update of one weight of ``weight_shape``/``weight_axes``
  whose first ``input_dims`` dimensions contract with ``x``'s trailing ones.

  Dropout applies only when ``apply`` gets a ``dropout`` rng (training); evaluation, decoding and
  merging are deterministic.
  """

  config: LoraConfig
  input_dims: int
  weight_shape: tuple[int, ...]
  weight_axes: tuple[str, ...]
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, n_in = self.config, self.input_dims
    a = self.param("a", nn.with_logical_partitioning(
        _a_init(n_in), tuple(self.weight_axes[:n_in]) + (RANK_AXIS,)),
                   tuple(self.weight_shape[:n_in]) + (cfg.rank,), jnp.float32)
    b = self.param("b", nn.with_logical_partitioning(
        nn.initializers.zeros, (RANK_AXIS,) + tuple(self.weight_axes[n_in:])),
                   (cfg.rank,) + tuple(self.weight_shape[n_in:]), jnp.float32)
    if cfg.dropout > 0 and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - cfg.dropout), 0).astype(x.dtype)
    h = jnp.tensordot(x, a.astype(self.dtype), axes=n_in)
    return cfg.scale * jnp.tensordot(h, b.astype(self.dtype), axes=1)


def adapter(config: LoraConfig, name: str, weight_shape: tuple[int, ...],
            weight_axes: tuple[str, ...], dtype: Any) -> Adapter:
  """The adapter of the weight ``name`` (a child of the module being defined)."""
  return Adapter(config, INPUT_DIMS[name], tuple(weight_shape), tuple(weight_axes), dtype,
                 name=name + ADAPTER_SUFFIX)


def is_adapter(path: ParamPath) -> bool:
  return len(path) > 1 and path[-2].endswith(ADAPTER_SUFFIX)


def split(params: Any) -> tuple[Any, Any]:
  """A model's parameter tree (arrays, shape structs or boxed) → ``(base, adapters)``, same nesting."""
  flat = flatten(params)
  return (nest({p: v for p, v in flat.items() if not is_adapter(p)}),
          nest({p: v for p, v in flat.items() if is_adapter(p)}))


def join(base: Any, adapters: Any) -> Any:
  """The inverse of ``split``: one tree the LoRA model applies."""
  return nest({**flatten(base), **flatten(adapters)})


def _weight_delta(a: Array, b: Array, input_dims: int) -> Array:
  """``A @ B`` in float32, mapped over any leading (stacked layer) axes: the weight's shape."""
  product = functools.partial(jnp.tensordot, axes=1, precision=jax.lax.Precision.HIGHEST)
  for _ in range(a.ndim - input_dims - 1):
    product = jax.vmap(product)
  return product(a.astype(jnp.float32), b.astype(jnp.float32))


def merge(base: Any, adapters: Any, config: LoraConfig) -> Any:
  """The base tree with each adapted weight replaced by ``W + scale * A @ B`` (in ``W``'s dtype).

  ``base`` and ``adapters`` must share a layout (both stacked or both per layer); pure, so it runs
  under jit (see ``merge_sharded``).
  """
  flat_base, flat_adapters = flatten(base), flatten(adapters)
  merged = dict(flat_base)
  for path, a in flat_adapters.items():
    if path[-1] != "a":
      continue
    name = path[-2][:-len(ADAPTER_SUFFIX)]
    weight_path = path[:-2] + (name,)
    w, b = flat_base[weight_path], flat_adapters[path[:-1] + ("b",)]
    delta = _weight_delta(a, b, INPUT_DIMS[name])
    merged[weight_path] = (w.astype(jnp.float32) + config.scale * delta).astype(w.dtype)
  return nest(merged)


def merge_sharded(base: Any, adapters: Any, config: LoraConfig) -> Any:
  """``merge`` on the devices, each merged weight on its base weight's sharding (no host copy)."""
  shardings = jax.tree.map(lambda x: x.sharding, base)
  return jax.jit(functools.partial(merge, config=config), out_shardings=shardings)(base, adapters)


def init_adapters(model: nn.Module, mesh: jax.sharding.Mesh, rules: partitioning.LogicalRules,
                  rng: jax.Array) -> Any:
  """Fresh adapters of a LoRA model, created already sharded; the base weights the same ``init``
  would draw are dead code that XLA removes, so no memory is spent on them."""
  boxed = split(partitioning.abstract_params(model))[1]
  shardings = partitioning.logical_shardings(boxed, mesh, rules)

  def init(key):
    return split(partitioning.unbox(model.init(key, np.ones((1, 1), np.int32))["params"]))[1]

  with partitioning.activate(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng)
