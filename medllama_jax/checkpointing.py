"""Parameter checkpoints in Orbax format: streamed writes, layout-aware sharded reads, checksums.

A model folder made by this project holds ``config.json`` (Hugging Face's schema), the tokenizer files
and ``params/``, an Orbax checkpoint of the parameter tree. Converters write ``params/`` one tensor at a
time (Orbax partial saves, finalized at the end) so memory stays bounded by the largest tensor, in the
per-layer layout (``layers_0``, ``layers_1``, ...). Models that scan over layers keep their parameters
stacked (``layers`` with a leading layer axis); ``load_params`` converts between the two layouts, so any
checkpoint loads into any model configuration, straight onto its target shardings.

Orbax's files carry no checksum of the data itself, so damaged bytes can decode into other
numbers. Every parameter checkpoint written here therefore gets ``params/checksums.json`` once its
tensors are written: per tensor (named by its path, ``layers_0/mlp/up_proj/kernel``) a 64-bit
checksum, the dtype and the shape. Reads check what they restored against it, in the stored layout
and dtype, and raise ``CheckpointCorrupted`` naming the tensor and its data files; a folder without
the file (written before checksums were recorded) loads with a warning. The checksum depends on the
values alone, not on the sharding or the number of hosts, so it is computed where the tensor lives:
one jitted reduction per sharded array on the devices, or numpy for host arrays, with equal results.

Reading or writing errors surface as one ``CheckpointError`` whose message is a single line naming
the folder (the Orbax or tensorstore exception stays chained as its cause).

Orbax takes only absolute local paths, so every function here resolves the folder it is given
(``storage.absolute``): a relative path means the current directory, as on any command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging
from etils import epath
from jax import lax
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from medllama_jax import progress, storage

PARAMS_DIR = "params"
CHECKSUMS_FILE = "checksums.json"
_CHECKSUMS_FORMAT = "medllama-checksums/1"
_LAYER_KEY = re.compile(r"layers_(\d+)$")

ParamPath = tuple[str, ...]


class CheckpointError(Exception):
  """A checkpoint that cannot be read, trusted or written; the message is one line naming it."""


class CheckpointUnreadable(CheckpointError, ValueError):
  """Orbax could not read a checkpoint: data files missing, truncated or undecodable."""


class CheckpointCorrupted(CheckpointError, ValueError):
  """A tensor read back differs from the checksum recorded when it was written."""


class CheckpointWriteFailed(CheckpointError, OSError):
  """The file system refused a checkpoint's data (a full disk, a file size limit, ...)."""


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


# ---- Checksums ----

# Each element, read as an unsigned integer of its width (1- and 2-byte elements widened to 32 bits,
# 8-byte ones as two 32-bit words), is xored with a multiple of its flat index (modulo 2**32) and
# scrambled by a 32-bit finalizer; the results are summed modulo 2**32. A sum does not depend on how
# the array is split across devices or hosts, and the index makes it see elements that moved. Two
# lanes with their own constants give 64 bits. Everything stays in uint32: jax runs without x64.
_INDEX_MULTIPLIER = np.uint32(0x9E3779B9)
_LANES = ((np.uint32(0x243F6A88), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35), 13),
          (np.uint32(0xB7E15162), np.uint32(0x7FEB352D), np.uint32(0x846CA68B), 15))
# Host arrays are hashed this many words at a time, so the temporaries stay in the CPU's cache.
_HOST_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class TensorChecksum:
  """What ``checksums.json`` records of one tensor: checksum (16 hex digits), dtype and shape."""

  checksum: str
  dtype: str
  shape: tuple[int, ...]

  @classmethod
  def of_lanes(cls, lanes: Sequence[int], dtype: Any, shape: Sequence[int]) -> TensorChecksum:
    return cls("".join(f"{int(lane):08x}" for lane in lanes), np.dtype(dtype).name,
               tuple(int(n) for n in shape))

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> TensorChecksum:
    return cls(str(record["checksum"]), str(record["dtype"]),
               tuple(int(n) for n in record["shape"]))

  def to_json(self) -> dict[str, Any]:
    return {"checksum": self.checksum, "dtype": self.dtype, "shape": list(self.shape)}

  def __str__(self) -> str:
    return f"{self.dtype}{list(self.shape)} {self.checksum}"


def _lane_terms(words: Any, index: Any, lane: tuple[Any, ...]) -> Any:
  """One lane's scrambled words; ``words`` and ``index`` are uint32 arrays of numpy or jax.numpy,
  so the host and the device compute the same function."""
  seed, first, second, shift = lane
  x = words ^ (index * _INDEX_MULTIPLIER + seed)
  x = (x ^ (x >> 16)) * first
  x = (x ^ (x >> shift)) * second
  return x ^ (x >> 16)


def _host_words(array: np.ndarray) -> np.ndarray:
  """The elements of ``array`` as flat unsigned words of their width (8-byte elements as two)."""
  flat = np.ascontiguousarray(array).reshape(-1)
  width = flat.dtype.itemsize
  if width in (1, 2, 4):
    return flat.view(np.dtype(f"u{width}"))
  if width == 8:
    return flat.view(np.uint32)
  raise TypeError(f"no checksum for {flat.dtype} elements")


def host_checksum(array: Any) -> TensorChecksum:
  """The checksum of a host array, computed with numpy (equal to the devices' for equal values)."""
  array = np.asarray(array)
  words = _host_words(array)
  offsets = np.arange(min(_HOST_CHUNK, words.size), dtype=np.uint32)
  sums = [0] * len(_LANES)
  for start in range(0, words.size, _HOST_CHUNK):
    chunk = words[start:start + _HOST_CHUNK].astype(np.uint32, copy=False)
    index = offsets[:chunk.size] + np.uint32(start % 2**32)
    for k, lane in enumerate(_LANES):
      sums[k] += int(_lane_terms(chunk, index, lane).sum(dtype=np.uint32))
  return TensorChecksum.of_lanes([s % 2**32 for s in sums], array.dtype, array.shape)


def _device_words(x: jax.Array) -> jax.Array:
  """The elements of ``x`` as uint32 words, as ``_host_words`` reads them (jax has no 8-byte
  types)."""
  width = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if width == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if width in (1, 2):
    return lax.bitcast_convert_type(x, jnp.dtype(f"u{width}")).astype(jnp.uint32)
  raise TypeError(f"no checksum for {x.dtype} elements")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Every element's row-major index modulo 2**32, built from per-axis iotas (no axis nears 2**32,
  a whole stacked tensor may)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _device_lanes(x: jax.Array) -> jax.Array:
  words, index = _device_words(x), _flat_index(x.shape)
  return jnp.stack([jnp.sum(_lane_terms(words, index, lane), dtype=jnp.uint32) for lane in _LANES])


def _all_lanes(arrays: list[jax.Array]) -> list[jax.Array]:
  return [_device_lanes(x) for x in arrays]


@functools.cache
def _jitted_all_lanes(out_shardings: tuple[jax.sharding.Sharding, ...]) -> Any:
  return jax.jit(_all_lanes, out_shardings=list(out_shardings))


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """Where a tensor's lanes go: replicated over its mesh, so every host can read them."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def _device_checksum_lanes(arrays: list[jax.Array]) -> list[jax.Array]:
  """The lanes of every array, reduced where its shards live: one program per set of devices, run
  one after another. (One program per tensor, dispatched together, leaves many programs with
  cross-device reductions in flight at once, which can deadlock XLA's CPU runtime: its in-process
  collectives wait for every device's thread.)"""
  groups: dict[frozenset, list[int]] = {}
  for i, x in enumerate(arrays):
    groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
  lanes: list[jax.Array | None] = [None] * len(arrays)
  for indices in groups.values():
    members = [arrays[i] for i in indices]
    reduced = _jitted_all_lanes(tuple(_replicated(x.sharding) for x in members))(members)
    jax.block_until_ready(reduced)
    for i, value in zip(indices, reduced):
      lanes[i] = value
  return lanes


def tensor_name(path: Sequence[Any]) -> str:
  """A tree path as ``checksums.json`` names it: keys, attribute names or indices joined by '/'."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def tensor_checksums(tree: Any) -> dict[str, TensorChecksum]:
  """The checksum of every leaf: jax arrays on their devices (every host calls this together), host
  arrays with numpy."""
  leaves = [(tensor_name(path), leaf if isinstance(leaf, jax.Array) else np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  on_devices = [(name, leaf) for name, leaf in leaves if isinstance(leaf, jax.Array)]
  lanes = _device_checksum_lanes([leaf for _, leaf in on_devices])
  fetched = dict(zip([name for name, _ in on_devices], jax.device_get(lanes)))
  return {name: (TensorChecksum.of_lanes(fetched[name], leaf.dtype, leaf.shape) if name in fetched
                 else host_checksum(leaf))
          for name, leaf in leaves}


def checksums_json(checksums: Mapping[str, TensorChecksum]) -> dict[str, Any]:
  """The JSON record of ``checksums``, as ``checksums.json`` and run checkpoints hold it."""
  return {"format": _CHECKSUMS_FORMAT,
          "tensors": {name: checksums[name].to_json() for name in sorted(checksums)}}


def checksums_from_json(record: Any, source: str) -> dict[str, TensorChecksum] | None:
  """The checksums of a JSON record (``source`` names it in messages); None, with a warning, for a
  format this version does not know."""
  if not isinstance(record, dict) or record.get("format") != _CHECKSUMS_FORMAT:
    logging.warning("%s: unknown checksum format %r; tensors are not verified", source,
                    record.get("format") if isinstance(record, dict) else type(record).__name__)
    return None
  try:
    return {str(name): TensorChecksum.from_json(entry) for name, entry in record["tensors"].items()}
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointCorrupted(
        f"{source}: malformed checksum record ({type(e).__name__}: {e})") from e


def write_checksums(directory: str, checksums: Mapping[str, TensorChecksum]) -> None:
  """``directory/checksums.json``, one line per tensor, written atomically by the primary host."""
  if jax.process_index() != 0:
    return
  record = checksums_json(checksums)
  lines = [f"  {json.dumps(name)}: {json.dumps(entry)}"
           for name, entry in record["tensors"].items()]
  storage.write_text_atomic(epath.Path(directory) / CHECKSUMS_FILE,
                            f'{{"format": {json.dumps(record["format"])}, "tensors": {{\n'
                            + ",\n".join(lines) + "\n}}\n")


# Folders already reported as unverified: readers of one tensor at a time warn once per folder.
_UNVERIFIED: set[str] = set()


def read_checksums(directory: str) -> dict[str, TensorChecksum] | None:
  """The checksums recorded in ``directory``; None (with one warning) for a folder without any."""
  path = epath.Path(directory) / CHECKSUMS_FILE
  if not path.exists():
    if directory not in _UNVERIFIED:
      _UNVERIFIED.add(directory)
      logging.warning("%s: no %s (written before checksums were recorded); tensors are not "
                      "verified", directory, CHECKSUMS_FILE)
    return None
  try:
    record = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointCorrupted(f"{path}: not valid JSON ({e})") from e
  return checksums_from_json(record, os.fspath(path))


def check_tensors(directory: str, arrays: Mapping[str, Any],
                  recorded: Mapping[str, TensorChecksum]) -> None:
  """Raises ``CheckpointCorrupted`` unless each array (by name) has its recorded checksum, dtype
  and shape; the message names the first differing tensor and its data files."""
  actual = tensor_checksums(dict(arrays))
  differing = [name for name in sorted(actual) if recorded.get(name) != actual[name]]
  if not differing:
    return
  name = differing[0]
  found = (f"reads as {actual[name]}, recorded {recorded[name]}" if name in recorded
           else "has no recorded checksum")
  others = f"; {len(differing) - 1} more tensor(s) differ" if len(differing) > 1 else ""
  raise CheckpointCorrupted(f"{directory}: tensor {name} is corrupted: {found}"
                            f"{_files_clause(directory, [name])}{others}")


# ---- One-line errors ----


def _exception_chain(error: BaseException) -> list[BaseException]:
  chain = [error]
  while len(chain) < 32 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip()
  line = text.splitlines()[0] if text else type(error).__name__
  return line if len(line) <= limit else line[:limit - 3] + "..."


def root_cause_line(error: BaseException) -> str:
  """The first line (at most 300 characters) of the innermost exception behind ``error``: Orbax
  wraps tensorstore's one-line reason in messages of many lines."""
  return _first_line(_exception_chain(error)[-1])


def _quoted(text: str) -> list[str]:
  return re.findall(r'"([^"]+)"', text)


def _is_path(text: str) -> bool:
  return text.startswith("/") or "://" in text


def _unreadable_message(directory: str, error: BaseException) -> str:
  """One line for a failed read: the tensor, tensorstore's reason and the data files when its
  message names a tensor (``"layers.mlp.up_proj/c/0/0"``), else the innermost error's first line."""
  text = _first_line(_exception_chain(error)[-1], limit=10_000)
  keys = [key for key in _quoted(text) if "/" in key and not _is_path(key)]
  if not keys:
    return f"{directory}: cannot be read: {root_cause_line(error)}"
  tensor = keys[0].split("/")[0].replace(".", "/")
  code = re.match(r"([A-Z_]+): ", text)
  reason = text.rsplit('": ', 1)[-1] + (f" [{code.group(1)}]" if code else "")
  if len(reason) > 300:
    reason = reason[:297] + "..."
  return (f"{directory}: tensor {tensor} cannot be read: {reason}"
          f"{_files_clause(directory, [tensor])}")


# Orbax reads tensors in concurrent asyncio tasks. Once one read fails, the others' errors (the
# same damaged files) are never retrieved: each is reported with its traceback as its task or
# coroutine is collected, and tensorstore's callbacks into the closed event loop fail too,
# thousands of lines before and after ``CheckpointUnreadable`` has said it in one. The two hooks
# below drop exactly those reports.


class _OrbaxTaskErrors(std_logging.Filter):
  """Drops asyncio's log records of Orbax tasks whose error was never retrieved."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and ("orbax" in message or "TensorStore" in message))


_ORBAX_TASK_ERRORS = _OrbaxTaskErrors()


class _OrbaxReadLeftovers:
  """A ``sys.unraisablehook`` that drops the leftovers of Orbax's failed reads (the errors of its
  collected coroutines, tensorstore's callbacks into the closed loop) and passes on the rest."""

  def __init__(self, previous: Any):
    self.previous = previous

  def __call__(self, unraisable: Any) -> None:
    if not self.is_leftover(unraisable):
      self.previous(unraisable)

  @staticmethod
  def is_leftover(unraisable: Any) -> bool:
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
      return "orbax" in code.co_filename
    error, traceback = unraisable.exc_value, unraisable.exc_traceback
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and traceback is not None
            and traceback.tb_frame.f_code.co_name.endswith("call_soon_threadsafe"))


def _drop_orbax_read_leftovers() -> None:
  """Installs both hooks (once; again if someone replaced ``sys.unraisablehook`` since)."""
  std_logging.getLogger("asyncio").addFilter(_ORBAX_TASK_ERRORS)
  if not isinstance(sys.unraisablehook, _OrbaxReadLeftovers):
    sys.unraisablehook = _OrbaxReadLeftovers(sys.unraisablehook)


@contextlib.contextmanager
def reading(directory: str) -> Iterator[None]:
  """Turns an error of Orbax or tensorstore reading ``directory`` (missing, truncated or
  undecodable files, a damaged index) into one ``CheckpointUnreadable`` with a one-line message."""
  _drop_orbax_read_leftovers()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # Orbax and tensorstore raise many types, none of them specific.
    raise CheckpointUnreadable(_unreadable_message(directory, e)) from e


def os_error_text(error: BaseException) -> str | None:
  """The operating system's error behind ``error`` in one line (``No space left on device (errno
  28): PATH``), from an ``OSError`` or tensorstore's ``os_error_code``; None when there is none."""
  for e in _exception_chain(error):
    if isinstance(e, OSError) and e.errno:
      where = f": {e.filename}" if e.filename else ""
      return f"{e.strerror or os.strerror(e.errno)} (errno {e.errno}){where}"
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      paths = [p for p in _quoted(str(e)) if _is_path(p)]
      where = f": {paths[-1]}" if paths else ""
      return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)}){where}"
  return None


class _OrbaxWriteTracebacks(std_logging.Filter):
  """Keeps Orbax's one-line reports of a write the file system refused, without their tracebacks.

  Each of Orbax's saving threads logs the same refused write with its traceback, hundreds of lines
  in all, before the save raises (or, asynchronous, before ``RunCheckpoints`` reports it) as one
  ``CheckpointWriteFailed`` that carries the whole chain as its cause.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname
        and os_error_text(record.exc_info[1]) is not None):
      record.exc_info = record.exc_text = None
    return True


_ORBAX_WRITE_TRACEBACKS = _OrbaxWriteTracebacks()


def shorten_orbax_write_errors() -> None:
  """Installs ``_OrbaxWriteTracebacks`` on absl's logger (which Orbax logs through), once."""
  std_logging.getLogger("absl").addFilter(_ORBAX_WRITE_TRACEBACKS)


@contextlib.contextmanager
def writing(directory: str) -> Iterator[None]:
  """Turns a write that the file system refused into one ``CheckpointWriteFailed`` naming
  ``directory`` and the OS error; other errors pass unchanged."""
  shorten_orbax_write_errors()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:
    reason = os_error_text(e)
    if reason is None:
      raise
    raise CheckpointWriteFailed(f"{directory}: not written: {reason}") from e


# ---- Where a tensor's bytes are ----

_LOCATION = re.compile(r"^[a-z]+:(?P<base>[^:]*):(?P<file>.+):\d+:\d+$")
# Keys of an array's zarr metadata (kept inline in the index), not of its data.
_ARRAY_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def _location_file(location: str) -> str:
  """``value:ocdbt.process_0/:d/4b9c...:0:2370`` → ``ocdbt.process_0/d/4b9c...``."""
  match = _LOCATION.match(location)
  return match.group("base") + match.group("file") if match else location


def _index_entries(kvstore: Any, location: str) -> Iterator[tuple[str, str]]:
  """(key, file holding its value) for every data key under the OCDBT B-tree node at
  ``location``."""
  node = ts.ocdbt.dump(kvstore, location).result()
  for entry in node["entries"]:
    child = next((v for v in entry.values() if isinstance(v, str) and v.startswith("btreenode:")),
                 None)
    if child is not None:
      yield from _index_entries(kvstore, child)
      continue
    key = entry.get("key", b"")
    key = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
    if not key.endswith(_ARRAY_METADATA):
      yield key, _location_file(entry.get("indirect_value", location))


def data_files(directory: str, names: Sequence[str]) -> list[str]:
  """The files holding the named tensors' bytes, relative to ``directory`` (a parameter checkpoint,
  or the ``state`` folder of a run checkpoint), read from Orbax's OCDBT index. Best effort: empty
  when the index itself cannot be read."""
  root, relative = epath.Path(directory), ""
  if (root / "state" / "manifest.ocdbt").exists():
    root, relative = root / "state", "state"
  url = os.fspath(root) if storage.is_remote(root) else f"file://{os.fspath(root)}"
  prefixes = tuple(name.replace("/", ".") + "/" for name in names)
  try:
    kvstore = ts.KvStore.open(url.rstrip("/") + "/").result()
    manifest = ts.ocdbt.dump(kvstore).result()
    entries = list(_index_entries(kvstore, manifest["versions"][-1]["root"]["location"]))
  except Exception:  # A damaged index: the message names the folder alone.
    return []
  return sorted({os.path.join(relative, file) for key, file in entries if key.startswith(prefixes)})


def _files_clause(directory: str, names: Sequence[str]) -> str:
  files = data_files(directory, names)
  if not files:
    return ""
  shown = [f + ("" if (epath.Path(directory) / f).exists() else " (missing)") for f in files[:4]]
  more = ", ..." if len(files) > 4 else ""
  return f" (data file{'s' if len(files) > 1 else ''} {', '.join(shown)}{more})"


# ---- Writing ----


def save_params_streaming(directory: str, tensors: Iterable[tuple[ParamPath, np.ndarray]]) -> int:
  """Writes an Orbax parameter checkpoint from ``(path, array)`` pairs, one tensor in memory at a time.

  ``checksums.json`` follows the tensors, their checksums computed on the host as each goes by.

  Nothing appears at ``directory`` until every tensor is written: an interrupted conversion leaves only
  Orbax's ``*.partial_save`` staging folder behind. Returns the number of tensors written.
  """
  directory = storage.absolute(directory)
  if epath.Path(directory).exists():
    raise FileExistsError(f"{directory}: refusing to overwrite an existing checkpoint")
  checksums: dict[str, TensorChecksum] = {}
  with _quiet():
    for path, array in tensors:
      array = np.asarray(array)
      with writing(directory):
        ocp_partial.save(directory, nest({path: array}))
      checksums["/".join(path)] = host_checksum(array)
    if not checksums:
      raise ValueError(f"{directory}: no tensors to write")
    with writing(directory):
      ocp_partial.finalize(directory)
      write_checksums(directory, checksums)
  return len(checksums)


def save_params(directory: str, params: Any) -> None:
  """Writes a whole (possibly sharded) parameter tree and its ``checksums.json``; every host calls
  this together (the checksums are reduced on the devices, across hosts)."""
  directory = storage.absolute(directory)
  checksums = tensor_checksums(params)
  with _quiet(), writing(directory):
    ocp.save(directory, params)
    write_checksums(directory, checksums)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("parameter checksums written")


# ---- Reading ----


def params_metadata(directory: str) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of every tensor in a parameter checkpoint, without reading any data."""
  directory = storage.absolute(directory)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"{directory}: no parameter checkpoint (expected an Orbax folder)")
  with _quiet():
    try:
      tree = ocp.metadata(directory).metadata
    except Exception as e:  # Orbax raises several types for unreadable folders.
      raise CheckpointUnreadable(f"{directory}: not a complete Orbax checkpoint "
                                 f"({root_cause_line(e)})") from e
  return {path: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
          for path, m in flatten(tree).items()}


def read_tensors(directory: str, paths: Iterable[ParamPath],
                 metadata: dict[ParamPath, jax.ShapeDtypeStruct] | None = None,
                 verify_checksums: bool = True) -> dict[ParamPath, np.ndarray]:
  """Reads only the named tensors to host memory (the rest of the checkpoint is not touched),
  checked against ``checksums.json`` unless ``verify_checksums`` is False."""
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
  with _quiet(), reading(directory):
    restored = ocp.load(directory, nest(abstract))
  flat = flatten(restored)
  out = {p: np.asarray(flat[p]) for p in wanted}
  recorded = read_checksums(directory) if verify_checksums else None
  if recorded is not None:
    check_tensors(directory, {"/".join(p): array for p, array in out.items()}, recorded)
  return out


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


def load_params(directory: str, abstract: Any, shardings: Any,
                verify_checksums: bool = True) -> Any:
  """Restores parameters into the layout, dtypes and shardings of ``abstract`` (the model's tree).

  ``abstract`` is a tree of ``ShapeDtypeStruct`` as the model expects them (stacked when the model scans
  over layers); ``shardings`` a matching tree of ``NamedSharding``. Checkpoints in the other layout are
  read per layer and stacked (or sliced) on the devices, one parameter group at a time. Each tensor
  is checked against ``checksums.json`` as stored (before stacking, slicing or casting) unless
  ``verify_checksums`` is False.
  """
  directory = storage.absolute(directory)
  stored = params_metadata(directory)
  recorded = read_checksums(directory) if verify_checksums else None
  target = flatten(abstract)
  target_shardings = flatten(shardings)
  stored_layout = checkpoint_layout(stored)
  target_layout = checkpoint_layout(target)
  expected = (set(target) if stored_layout == target_layout
              else _other_layout_paths(target, target_layout, stored))
  _check_same_tensors(directory, stored, expected)

  def restore(specs: dict[ParamPath, jax.ShapeDtypeStruct]) -> dict[ParamPath, jax.Array]:
    if recorded is None:
      return _load(directory, stored, specs)
    return _load_checked(directory, stored, specs, recorded)

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
               target_layout, extra=progress.FILE_ONLY)
  return nest(out)


def _load(directory: str, stored: dict[ParamPath, Any],
          specs: dict[ParamPath, jax.ShapeDtypeStruct]) -> dict[ParamPath, jax.Array]:
  """The tensors of ``specs`` (stored names), read straight into their dtypes and shardings."""
  with _quiet(), reading(directory):
    tree = ocp.load(directory, nest({p: specs.get(p, ocp.PLACEHOLDER) for p in stored}))
  return {p: v for p, v in flatten(tree).items() if p in specs}


def _load_checked(directory: str, stored: dict[ParamPath, Any],
                  specs: dict[ParamPath, jax.ShapeDtypeStruct],
                  recorded: Mapping[str, TensorChecksum]) -> dict[ParamPath, jax.Array]:
  """``_load`` with every tensor read in its stored dtype, checked, then cast on the devices.

  The tensors that keep their dtype are read together; each one that changes dtype is read alone,
  so a cast never holds more than one tensor twice.
  """
  same = {p: s for p, s in specs.items() if s.dtype == stored[p].dtype}
  groups = ([same] if same else []) + [{p: s} for p, s in specs.items() if p not in same]
  out: dict[ParamPath, jax.Array] = {}
  for group in groups:
    read = _load(directory, stored, {p: s.update(dtype=stored[p].dtype) for p, s in group.items()})
    check_tensors(directory, {"/".join(p): array for p, array in read.items()}, recorded)
    out.update({p: cast_to(array, group[p]) for p, array in read.items()})
  return out


def cast_to(array: jax.Array, spec: jax.ShapeDtypeStruct) -> jax.Array:
  """``array`` in ``spec``'s dtype on ``spec``'s sharding; ``array`` itself if already in it."""
  if array.dtype == spec.dtype:
    return array
  cast = jax.jit(_astype, static_argnums=1, out_shardings=spec.sharding)
  return cast(array, np.dtype(spec.dtype))


def _astype(x: jax.Array, dtype: np.dtype) -> jax.Array:
  return x.astype(dtype)


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
