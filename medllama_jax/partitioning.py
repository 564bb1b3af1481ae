"""Everything about meshes lives here: building the Mesh, logical→mesh rules, sharded init and jit.

The model names its axes logically (``embed``, ``heads``, ``activation_batch``...); this module maps
those names to the mesh axes ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded) and ``tensor`` (Megatron-style model parallelism over heads,
MLP width and vocabulary). The same code runs on one CPU (a 1×1×1 mesh) and on a multi-host pod.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from medllama_jax import progress

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
    # Activations: the batch is split over every data-parallel axis; heads, MLP width and vocabulary
    # over the tensor axis; the residual stream is replicated across tensor shards.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Parameters: FSDP shards the model dimension, tensor parallelism the head/MLP/vocab dimensions.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def resolve_axis_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the single ``-1`` in ``sizes`` by whatever makes the product equal ``num_devices``."""
  sizes = tuple(int(s) for s in sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh sizes {sizes}: {num_devices} devices are not divisible by {known}")
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
        f"but {num_devices} are available")
  return sizes


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """``"2,2,2"`` (data,fsdp,tensor) or ``"data=2,fsdp=-1"`` → axis sizes; missing named axes are 1."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if parts and all(re.fullmatch(r"-?\d+", p) for p in parts):
    if len(parts) != len(MESH_AXES):
      raise ValueError(f"mesh {spec!r}: give {len(MESH_AXES)} sizes ({','.join(MESH_AXES)})")
    return dict(zip(MESH_AXES, (int(p) for p in parts)))
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in parts:
    name, _, value = part.partition("=")
    if name not in sizes or not re.fullmatch(r"-?\d+", value):
      raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE with AXIS in {MESH_AXES}")
    sizes[name] = int(value)
  return sizes


_REPLICATED: set[tuple[int, tuple, tuple]] = set()


def _note_replicated(dim: int, logical_axes: tuple, names: tuple) -> None:
  """Logs (once per case, in the log file) a dimension left whole because the mesh does not divide
  it: correct, and worth knowing when reading a profile (e.g. a decode batch of 2 on fsdp 4)."""
  if (dim, logical_axes, names) not in _REPLICATED:
    _REPLICATED.add((dim, logical_axes, names))
    logging.info("dimension %d (%s) is not divisible by mesh axes %s; replicating it", dim,
                 logical_axes, names, extra=progress.FILE_ONLY)


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over all devices (of every host); ``-1`` takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  requested = math.prod((data, fsdp, tensor))
  if -1 not in (data, fsdp, tensor) and requested < len(devices) and jax.process_count() == 1:
    logging.warning("mesh uses %d of %d devices", requested, len(devices))
    devices = devices[:requested]
  requested_sizes = dict(zip(MESH_AXES, (data, fsdp, tensor)))
  if -1 not in (data, fsdp, tensor) and requested > len(devices):
    hint = (f"; on CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{requested}" if devices[0].platform == "cpu" else "")
    raise ValueError(f"mesh {requested_sizes} needs {requested} devices but {len(devices)} "
                     f"{devices[0].platform} device(s) are present{hint}")
  shape = resolve_axis_sizes((data, fsdp, tensor), len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  mesh = Mesh(device_array, MESH_AXES)
  logging.info("mesh %s over %d devices", dict(mesh.shape), len(devices), extra=progress.FILE_ONLY)
  return mesh


@gin.configurable
def logical_axis_rules(rules: LogicalRules | None = None) -> LogicalRules:
  """The rules in force: ``DEFAULT_RULES`` unless gin binds others."""
  return tuple(DEFAULT_RULES if rules is None else (tuple(r) for r in rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Makes the model's logical activation constraints resolve against ``mesh``."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def mesh_axes_size(mesh: Mesh | AbstractMesh, axes: str | tuple[str, ...] | None) -> int:
  """How many shards the mesh axes ``axes`` (one name, several, or None) split a dimension into."""
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in names)


def spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh | AbstractMesh,
             rules: LogicalRules) -> PartitionSpec:
  """Logical axes → PartitionSpec for an array of ``shape``.

  A dimension that its mesh axes do not divide evenly (e.g. 8 KV heads on a 16-way tensor axis) is
  replicated rather than failing, and the fallback is logged, so any mesh can hold any model.
  """
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  fixed, used = [], set()
  for dim, axes in zip(shape, spec):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    if any(n in used for n in names):
      names = ()
    if names and dim % mesh_axes_size(mesh, names):
      _note_replicated(dim, tuple(logical_axes), names)
      names = ()
    used.update(names)
    fixed.append(None if not names else (names[0] if len(names) == 1 else names))
  return PartitionSpec(*fixed)


def active_mesh() -> AbstractMesh | None:
  """The mesh that the program being traced is partitioned over (set by ``activate``), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def compile_platform() -> str:
  """``tpu``, ``gpu`` or ``cpu``: the platform of the devices the traced program is compiled for.

  With a mesh active, its devices decide, so compiling for libtpu's compile-only TPU devices on a CPU
  host (the planner) says ``tpu``; without one, jit compiles for the default device.
  """
  mesh = active_mesh()
  device = mesh.abstract_device if mesh is not None else None
  platform = device.platform if device is not None else jax.devices()[0].platform
  return "gpu" if platform in ("cuda", "rocm") else platform


def activation_spec(shape: Sequence[int], logical_axes: Sequence[str | None]) -> PartitionSpec:
  """``spec_for`` inside the model: against the active mesh and the logical rules in force.

  An all-replicated spec when no mesh is active. This is how a kernel that must run per shard
  (``shard_map``) learns which mesh axes hold which of its dimensions without naming any itself.
  """
  mesh = active_mesh()
  if mesh is None:
    return PartitionSpec(*(None,) * len(shape))
  return spec_for(shape, logical_axes, mesh, nn.get_logical_axis_rules())


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for a tree of ``nn.LogicallyPartitioned`` boxes (e.g. from ``jax.eval_shape``)."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def unbox(tree: Any) -> Any:
  """Strips ``nn.LogicallyPartitioned`` boxes, leaving the arrays (or shape structs)."""
  return nn.meta.unbox(tree)


def placed(abstract: Any, shardings: Any) -> Any:
  """``abstract``'s shapes and dtypes placed on ``shardings``: what a checkpoint is restored onto (so
  the reader's mesh and device count need not be the writer's) and what the planner compiles for."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def abstract_params(model: nn.Module, example_tokens_shape: tuple[int, int] = (1, 1)) -> Any:
  """The boxed parameter tree as ``ShapeDtypeStruct``s: shapes and logical names, no memory."""
  tokens = jax.ShapeDtypeStruct(example_tokens_shape, np.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def param_shardings(model: nn.Module, mesh: Mesh, rules: LogicalRules) -> Any:
  return logical_shardings(abstract_params(model), mesh, rules)


def init_params(model: nn.Module, mesh: Mesh, rules: LogicalRules, rng: jax.Array) -> Any:
  """Random parameters created already sharded: no host ever holds the whole model."""
  shardings = param_shardings(model, mesh, rules)

  def init(key):
    return unbox(model.init(key, np.ones((1, 1), np.int32))["params"])

  with activate(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
  """Sharding of ``[batch, length, ...]`` inputs: batch over the data-parallel axes."""
  axes = ("activation_batch", "activation_length") + (None,) * (ndim - 2)
  return NamedSharding(mesh, nn.logical_to_mesh_sharding(PartitionSpec(*axes), mesh, rules).spec)


def shard_batch_spec(mesh: Mesh, rules: LogicalRules, shape: Sequence[int]) -> NamedSharding:
  """Like ``batch_sharding`` but replicates the batch when the data axes do not divide it."""
  axes = ("activation_batch", "activation_length") + (None,) * (len(shape) - 2)
  return NamedSharding(mesh, spec_for(shape, axes, mesh, rules))


def make_forward(model: nn.Module, mesh: Mesh, rules: LogicalRules, params_sharding: Any,
                 batch_shape: Sequence[int]) -> Callable[..., jax.Array]:
  """A jit'd ``(params, tokens, positions, segment_ids) -> logits`` with explicit shardings."""
  data = shard_batch_spec(mesh, rules, batch_shape)
  logits_sharding = NamedSharding(
      mesh, spec_for(tuple(batch_shape) + (model.config.vocab_size,),
                     ("activation_batch", "activation_length", "activation_vocab"), mesh, rules))

  def forward(params, tokens, positions, segment_ids):
    with nn.logical_axis_rules(rules):
      logits, _ = model.apply({"params": params}, tokens, positions, segment_ids)
    return logits

  jitted = jax.jit(forward, in_shardings=(params_sharding, data, data, data),
                   out_shardings=logits_sharding)

  def run(params, tokens, positions, segment_ids):
    with activate(mesh, rules):
      return jitted(params, tokens, positions, segment_ids)

  return run


# Set to "auto" (``scripts/tpu/medllama_tpu.py launch`` does, on every TPU worker): JAX finds the
# other processes itself, from the TPU VM's metadata server (or SLURM, Open MPI, Kubernetes).
AUTO_DISTRIBUTED_ENV = "MEDLLAMA_DISTRIBUTED"


def initialize_distributed() -> None:
  """Joins the multi-host runtime when this process is one of several; a no-op on one host.

  Three ways in, first match wins: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` name the peers (as a GPU cluster launcher would); ``MEDLLAMA_DISTRIBUTED=auto``
  lets JAX detect them (TPU VM slices: the workers are read from the VM's metadata server);
  ``TPU_WORKER_HOSTNAMES`` listing several hosts (TPU slices on GKE) does the same. The explicit
  variables also run several CPU processes on one machine (as the tests do): their collectives go
  over gloo, JAX's default ``jax_cpu_collectives_implementation`` (``mpi`` can be chosen through
  JAX's own flag or ``JAX_CPU_COLLECTIVES_IMPLEMENTATION``).
  """
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  auto = os.environ.get(AUTO_DISTRIBUTED_ENV, "")
  if auto not in ("", "auto"):
    raise ValueError(f"{AUTO_DISTRIBUTED_ENV}={auto!r}: the only value is 'auto' (unset: one host "
                     "unless JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID are set)")
  on_gke_tpu_slice = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if coordinator and num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif auto or on_gke_tpu_slice:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
