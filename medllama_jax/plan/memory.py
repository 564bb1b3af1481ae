"""Per-device bytes: exact ones from shapes and shardings, the rest from the compiler's memory analysis.

Parameters, optimizer state and the input batch are arguments of the train step whose size on each
device follows from their shapes, dtypes and shardings alone, so they are counted exactly. What the
step allocates while it runs (activations kept for the backward pass, gradients, collective buffers)
exists only in the compiled program: XLA's buffer assignment reports it as ``temp`` bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded arrays or ``ShapeDtypeStruct``s.

  Shardings built by ``partitioning.spec_for`` divide every dimension evenly, so every device holds
  the same shard shape; a replicated leaf counts whole on each device.
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """XLA's buffer assignment of one device's program, in bytes.

  ``alias`` is the part of ``output`` written in place of donated arguments (the new train state over
  the old), so it is allocated once.
  """

  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> "CompiledMemory":
    stats = compiled.memory_analysis()
    if stats is None:
      raise RuntimeError("the compiler reported no memory analysis for this program")
    return cls(argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
               alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
               code=int(stats.generated_code_size_in_bytes))

  @property
  def peak(self) -> int:
    """Everything live at once on a device: inputs, non-aliased outputs, temporaries and the program."""
    return self.argument + self.output - self.alias + self.temp + self.code
