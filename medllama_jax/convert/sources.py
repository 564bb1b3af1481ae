"""Lazy tensor sources: name → shape/dtype up front, one tensor's data at a time on demand.

Converters first check every name and shape against the model config (so a bad checkpoint fails before
anything is written), then pull tensors one by one, so peak memory is a few tensors, never the model.
"""

from __future__ import annotations

import abc
import glob
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from medllama_jax.convert.safetensors_io import SafetensorsError, SafetensorsReader


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, tensor or field at fault."""


class TensorSource(abc.ABC):
  """A read-only, lazily loaded mapping from tensor names to arrays."""

  @abc.abstractmethod
  def names(self) -> list[str]:
    """Every tensor name, without reading data."""

  @abc.abstractmethod
  def shape(self, name: str) -> tuple[int, ...]:
    """The stored shape of ``name``, without reading data."""

  @abc.abstractmethod
  def read(self, name: str) -> np.ndarray:
    """The data of ``name`` as a fresh numpy array (bfloat16 via ``ml_dtypes``)."""

  @abc.abstractmethod
  def where(self, name: str) -> str:
    """The file that holds ``name``, for error messages."""

  def close(self) -> None:
    """Releases open files."""

  def __enter__(self) -> "TensorSource":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _read_index(path: str) -> dict[str, str]:
  try:
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{path}: not a valid checkpoint index ({e!r})") from e
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{path}: weight_map is not an object")
  return weight_map


class SafetensorsSource(TensorSource):
  """A HF folder of ``model.safetensors`` or ``model-*.safetensors`` shards with their index."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      weight_map = _read_index(index)
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
      weight_map = None
    if not files:
      raise ConversionError(f"{directory}: no *.safetensors files")
    self._readers: dict[str, SafetensorsReader] = {}
    self._file_of: dict[str, str] = {}
    try:
      for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
          raise ConversionError(f"{index}: lists {name}, which is not in {directory}")
        reader = SafetensorsReader(path)
        self._readers[path] = reader
        for tensor in reader.names():
          if tensor in self._file_of:
            raise ConversionError(f"{path}: tensor {tensor!r} is also in {self._file_of[tensor]}")
          self._file_of[tensor] = path
      if weight_map is not None:
        for tensor, name in weight_map.items():
          if self._file_of.get(tensor) != os.path.join(directory, name):
            raise ConversionError(f"{index}: tensor {tensor!r} is listed in {name} but not stored there")
    except SafetensorsError as e:
      self.close()
      raise ConversionError(str(e)) from e
    except ConversionError:
      self.close()
      raise

  def names(self) -> list[str]:
    return list(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._readers[self._file_of[name]].info(name).shape

  def read(self, name: str) -> np.ndarray:
    try:
      return self._readers[self._file_of[name]].read(name)
    except (SafetensorsError, OSError) as e:
      raise ConversionError(f"{self.where(name)}: tensor {name!r}: {e}") from e

  def where(self, name: str) -> str:
    return self._file_of.get(name, "<no file>")

  def close(self) -> None:
    for reader in self._readers.values():
      reader.close()
    self._readers = {}


def torch_to_numpy(tensor: Any) -> np.ndarray:
  """A CPU torch tensor as numpy, keeping bfloat16 exact (numpy has no native bfloat16)."""
  import torch

  tensor = tensor.detach().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
  return tensor.numpy().copy()


def load_torch_file(path: str) -> dict[str, Any]:
  """``torch.load`` with ``weights_only=True`` (no pickled code runs) and ``mmap=True``: tensors stay on
  disk until read, so opening a multi-GB shard costs no memory."""
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path}: reading PyTorch checkpoints needs torch "
                          "(pip install 'medllama-jax[torch]')") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for broken files.
    raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
  return state


class TorchBinSource(TensorSource):
  """A HF folder of ``pytorch_model.bin`` or ``pytorch_model-*.bin`` shards with their index."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "pytorch_model.bin.index.json")
    if os.path.exists(index):
      files = sorted(set(_read_index(index).values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not files:
      raise ConversionError(f"{directory}: no pytorch_model*.bin files")
    self._tensors: dict[str, Any] = {}
    self._file_of: dict[str, str] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise ConversionError(f"{index}: lists {name}, which is not in {directory}")
      for tensor, value in load_torch_file(path).items():
        self._tensors[tensor] = value
        self._file_of[tensor] = path

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def read(self, name: str) -> np.ndarray:
    try:
      return torch_to_numpy(self._tensors[name])
    except Exception as e:  # A truncated mmapped file fails only when its bytes are touched.
      raise ConversionError(f"{self.where(name)}: tensor {name!r} cannot be read ({e})") from e

  def where(self, name: str) -> str:
    return self._file_of.get(name, "<no file>")

  def close(self) -> None:
    self._tensors = {}


def open_hf_weights(directory: str) -> TensorSource:
  """The weights of a HF model folder: safetensors if present, else PyTorch ``.bin`` files."""
  if not os.path.isdir(directory):
    raise ConversionError(f"{directory}: not a directory")
  if glob.glob(os.path.join(directory, "*.safetensors")):
    return SafetensorsSource(directory)
  if glob.glob(os.path.join(directory, "pytorch_model*.bin")):
    return TorchBinSource(directory)
  raise ConversionError(f"{directory}: no model weights (expected *.safetensors or pytorch_model*.bin)")
