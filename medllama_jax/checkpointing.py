"""Parameter checkpoints in Orbax format: streamed writes, layout-aware sharded reads.

A model folder made by this project holds ``config.json`` (Hugging Face's schema), the tokenizer files
and ``params/``, an Orbax checkpoint of the parameter tree. Converters write ``params/`` one tensor at a
time (Orbax partial saves, finalized at the end) so memory stays bounded by the largest tensor, in the
per-layer layout (``layers_0``, ``layers_1``, ...). Models that scan over layers keep their parameters
stacked (``layers`` with a leading layer axis); ``load_params`` converts between the two layouts, so any
checkpoint loads into any model configuration, straight onto its target shardings.

Orbax takes only absolute local paths, so every function here resolves the folder it is given
(``storage.absolute``): a relative path means the current directory, as on any command line.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from orbax.checkpoint import v1 as ocp
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from medllama_jax import storage

PARAMS_DIR = "params"
_LAYER_KEY = re.compile(r"layers_(\d+)$")

ParamPath = tuple[str, ...]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Orbax's v1 API warns that it is experimental on every call; the warning says nothing to our users."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", module=r"orbax\..*")
    yield


def nest(flat: dict[ParamPath, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def flatten(tree: Any) -> dict[ParamPath, Any]:
  """``{"a": {"b": x}}`` → ``{("a", "b"): x}``, in sorted key order."""
  out: dict[ParamPath, Any] = {}

  def visit(node, prefix):
    if isinstance(node, dict):
      for key in sorted(node):
        visit(node[key], prefix + (key,))
    else:
      out[prefix] = node

  visit(tree, ())
  return out


def save_params_streaming(directory: str, tensors: Iterable[tuple[ParamPath, np.ndarray]]) -> int:
  """Writes an Orbax parameter checkpoint from ``(path, array)`` pairs, one tensor in memory at a time.

  Nothing appears at ``directory`` until every tensor is written: an interrupted conversion leaves only
  Orbax's ``*.partial_save`` staging folder behind. Returns the number of tensors written.
  """
  directory = storage.absolute(directory)
  if epath.Path(directory).exists():
    raise FileExistsError(f"{directory}: refusing to overwrite an existing checkpoint")
  count = 0
  with _quiet():
    for path, array in tensors:
      ocp_partial.save(directory, nest({path: np.asarray(array)}))
      count += 1
    if not count:
      raise ValueError(f"{directory}: no tensors to write")
    ocp_partial.finalize(directory)
  return count


def save_params(directory: str, params: Any) -> None:
  """Writes a whole (possibly sharded) parameter tree; every host calls this together."""
  directory = storage.absolute(directory)
  with _quiet():
    ocp.save(directory, params)


def params_metadata(directory: str) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of every tensor in a parameter checkpoint, without reading any data."""
  directory = storage.absolute(directory)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"{directory}: no parameter checkpoint (expected an Orbax folder)")
  with _quiet():
    try:
      tree = ocp.metadata(directory).metadata
    except Exception as e:  # Orbax raises several types for unreadable folders.
      raise ValueError(f"{directory}: not a complete Orbax checkpoint ({e})") from e
  return {path: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
          for path, m in flatten(tree).items()}


def read_tensors(directory: str, paths: Iterable[ParamPath],
                 metadata: dict[ParamPath, jax.ShapeDtypeStruct] | None = None
                 ) -> dict[ParamPath, np.ndarray]:
  """Reads only the named tensors to host memory (the rest of the checkpoint is not touched)."""
  directory = storage.absolute(directory)
  metadata = params_metadata(directory) if metadata is None else metadata
  wanted = set(paths)
  unknown = wanted - set(metadata)
  if unknown:
    raise KeyError(f"{directory}: no tensor(s) {sorted('/'.join(p) for p in unknown)}")
  device = jax.local_devices(backend="cpu")[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = {p: (jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding) if p in wanted
                  else ocp.PLACEHOLDER) for p, m in metadata.items()}
  with _quiet():
    restored = ocp.load(directory, nest(abstract))
  flat = flatten(restored)
  return {p: np.asarray(flat[p]) for p in wanted}


def checkpoint_layout(paths: Iterable[ParamPath]) -> str:
  """``"stacked"`` if layers are under one ``layers`` subtree, ``"per_layer"`` for ``layers_N``."""
  tops = {p[0] for p in paths}
  if "layers" in tops:
    return "stacked"
  if any(_LAYER_KEY.match(t) for t in tops):
    return "per_layer"
  raise ValueError(f"no decoder layers in checkpoint (top-level keys: {sorted(tops)})")


def stacked_path(path: ParamPath) -> ParamPath | None:
  """``("layers_3", "mlp", "up_proj")`` → ``("layers", "mlp", "up_proj")``; None for non-layer paths."""
  return ("layers",) + path[1:] if _LAYER_KEY.match(path[0]) else None


def layer_slice_sharding(stacked: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
  """The sharding of one layer's slice of a stacked ``[layers, ...]`` parameter."""
  return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*stacked.spec[1:]))


def stack_on_devices(pieces: list[jax.Array], sharding: jax.sharding.NamedSharding) -> jax.Array:
  """Stacks per-layer arrays into one ``[layers, ...]`` array placed on ``sharding``."""
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*pieces)


def load_params(directory: str, abstract: Any, shardings: Any) -> Any:
  """Restores parameters into the layout, dtypes and shardings of ``abstract`` (the model's tree).

  ``abstract`` is a tree of ``ShapeDtypeStruct`` as the model expects them (stacked when the model scans
  over layers); ``shardings`` a matching tree of ``NamedSharding``. Checkpoints in the other layout are
  read per layer and stacked (or sliced) on the devices, one parameter group at a time.
  """
  directory = storage.absolute(directory)
  stored = params_metadata(directory)
  target = flatten(abstract)
  target_shardings = flatten(shardings)
  stored_layout = checkpoint_layout(stored)
  target_layout = checkpoint_layout(target)
  expected = (set(target) if stored_layout == target_layout
              else _other_layout_paths(target, target_layout, stored))
  _check_same_tensors(directory, stored, expected)

  def restore(abstract_flat: dict[ParamPath, Any]) -> dict[ParamPath, jax.Array]:
    with _quiet():
      tree = ocp.load(directory, nest(
          {p: abstract_flat.get(p, ocp.PLACEHOLDER) for p in stored}))
    return {p: v for p, v in flatten(tree).items() if p in abstract_flat}

  if stored_layout == target_layout:
    specs = {p: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=target_shardings[p])
             for p, t in target.items()}
    _check_shapes(directory, stored, specs)
    return nest(restore(specs))

  out: dict[ParamPath, jax.Array] = {}
  for path, t in target.items():
    if path in out:
      continue
    sharding = target_shardings[path]
    if stacked_path(path) is None and path[0] != "layers":
      specs = {path: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding)}
      _check_shapes(directory, stored, specs)
      out.update(restore(specs))
    elif target_layout == "stacked":
      # Read the per-layer slices onto the slice sharding, then stack onto the stacked sharding.
      specs = {(f"layers_{i}",) + path[1:]: jax.ShapeDtypeStruct(
          t.shape[1:], t.dtype, sharding=layer_slice_sharding(sharding))
               for i in range(t.shape[0])}
      _check_shapes(directory, stored, specs)
      pieces = restore(specs)
      out[path] = stack_on_devices([pieces[p] for p in specs], sharding)
      del pieces
    else:
      # Read the stacked group once, then slice out every layer's tensor.
      source = stacked_path(path)
      layers = {p: int(_LAYER_KEY.match(p[0]).group(1)) for p in target if stacked_path(p) == source}
      stacked_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
          None, *sharding.spec))
      group = restore({source: jax.ShapeDtypeStruct(stored[source].shape, t.dtype,
                                                    sharding=stacked_sharding)})[source]
      if group.shape[1:] != t.shape or group.shape[0] != len(layers):
        raise ValueError(f"{directory}: tensor {'/'.join(source)} has shape {group.shape}, the model "
                         f"config expects {(len(layers),) + tuple(t.shape)}")
      for p, layer in layers.items():
        out[p] = jax.jit(lambda x, i=layer: x[i], out_shardings=target_shardings[p])(group)
      del group
  logging.info("restored %d tensors from %s (%s layout → %s)", len(out), directory, stored_layout,
               target_layout)
  return nest(out)


def _other_layout_paths(target: dict[ParamPath, Any], target_layout: str,
                        stored: dict[ParamPath, Any]) -> set[ParamPath]:
  """The tensor names a checkpoint in the other layout must hold for this target."""
  names: set[ParamPath] = set()
  for path, t in target.items():
    if target_layout == "stacked" and path[0] == "layers":
      names.update((f"layers_{i}",) + path[1:] for i in range(t.shape[0]))
    elif target_layout == "per_layer" and _LAYER_KEY.match(path[0]):
      names.add(("layers",) + path[1:])
    else:
      names.add(path)
  return names


def _check_same_tensors(directory: str, stored: dict[ParamPath, Any], expected: set[ParamPath]) -> None:
  missing = sorted("/".join(p) for p in expected - set(stored))
  unexpected = sorted("/".join(p) for p in set(stored) - expected)
  if missing or unexpected:
    raise ValueError(f"{directory}: checkpoint does not match the model config: "
                     f"missing tensors {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                     f"unexpected tensors {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")


def _check_shapes(directory: str, stored: dict[ParamPath, Any], specs: dict[ParamPath, Any]) -> None:
  for path, spec in specs.items():
    if tuple(stored[path].shape) != tuple(spec.shape):
      raise ValueError(f"{directory}: tensor {'/'.join(path)} has shape {tuple(stored[path].shape)}, "
                       f"the model config expects {tuple(spec.shape)}")
