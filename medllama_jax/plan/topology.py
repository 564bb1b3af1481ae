"""Target hardware for a plan: which chip, how many, how much HBM each has, and its bf16 peak.

A target is written as users rent it:

* a Cloud TPU slice name: ``v4-128``, ``v5p-256``, ``v5litepod-16`` (or ``v5e-16``), ``v6e-64``. The
  number in v4 and v5p names counts TensorCores, two per chip (v5p-256 is 128 chips); v5e and v6e names
  count chips. The physical topology (``4x4x8``) is derived for power-of-two chip counts, the shapes
  Google provisions; other counts are given explicitly, ``v5p:4x4x12``.
* GPUs: ``8xH100``, ``16 x A100-80GB`` (``A100-40GB``, ``A100-80GB``, ``H100``, ``H200``).

HBM is the data-sheet capacity per chip; peak bf16 FLOP/s come from ``train.throughput``'s table (the
one the trainer's MFU uses), looked up by the ``device_kind`` jax reports for the chip.
"""

from __future__ import annotations

import dataclasses
import math
import re

from medllama_jax.train import throughput

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator type.

  ``tpu_name`` is libtpu's name for the generation (``v5`` is v5p) and ``torus_dims`` its number of
  torus dimensions; both are None for GPUs. ``cores_per_chip_in_name`` is how many of the slice name's
  units one chip is (2 where names count TensorCores).
  """

  name: str
  device_kind: str
  hbm_bytes: int
  tpu_name: str | None = None
  torus_dims: int | None = None
  cores_per_chip_in_name: int = 1
  chip_config: str = "default"

  @property
  def is_tpu(self) -> bool:
    return self.tpu_name is not None

  @property
  def peak_bf16_flops(self) -> float:
    for prefix, flops in throughput.PEAK_BF16_FLOPS:
      if self.device_kind.startswith(prefix):
        return flops
    raise KeyError(f"{self.name}: device kind {self.device_kind!r} has no peak in "
                   "train.throughput.PEAK_BF16_FLOPS")


# Slice-name prefix (lower case) -> chip. v4 and v5p chips are "megacore": one jax device spans the
# chip's two TensorCores.
TPU_CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", "TPU v4", 32 * GIB, "v4", 3, 2, "megacore"),
    "v5p": Chip("TPU v5p", "TPU v5p", 95 * GIB, "v5", 3, 2, "megacore"),
    "v5litepod": Chip("TPU v5e", "TPU v5 lite", 16 * GIB, "v5e", 2),
    "v5e": Chip("TPU v5e", "TPU v5 lite", 16 * GIB, "v5e", 2),
    "v6e": Chip("TPU v6e", "TPU v6 lite", 32 * GIB, "v6e", 2),
}

GPU_CHIPS: dict[str, Chip] = {
    "a100-40gb": Chip("A100-40GB", "NVIDIA A100", 40 * GIB),
    "a100-80gb": Chip("A100-80GB", "NVIDIA A100", 80 * GIB),
    "h100": Chip("H100", "NVIDIA H100", 80 * GIB),
    "h200": Chip("H200", "NVIDIA H200", 141 * GIB),
}

# Chips per host as libtpu's compile-only topology expects them (four chips, a 2x2 tray).
TPU_CHIPS_PER_HOST = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Target:
  """``num_chips`` chips of one kind; ``torus`` is the TPU slice's physical shape (None for GPUs)."""

  spec: str
  chip: Chip
  num_chips: int
  torus: tuple[int, ...] | None = None

  @property
  def tpu_topology_name(self) -> str:
    """libtpu's name of the slice, e.g. ``v5:4x4x8``."""
    if self.torus is None:
      raise ValueError(f"{self.spec}: not a TPU slice")
    return f"{self.chip.tpu_name}:{'x'.join(map(str, self.torus))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    torus = tuple(self.torus) + (1,) * (3 - len(self.torus))
    return tuple(min(b, t) for b, t in zip(TPU_CHIPS_PER_HOST, torus))

  @property
  def hbm_bytes_total(self) -> int:
    return self.chip.hbm_bytes * self.num_chips

  def describe(self) -> str:
    shape = f" ({'x'.join(map(str, self.torus))})" if self.torus else ""
    return (f"{self.spec}: {self.num_chips} x {self.chip.name}{shape}, "
            f"{self.chip.hbm_bytes / GIB:.0f} GiB HBM and "
            f"{self.chip.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s per chip")


def standard_torus(num_chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Google provisions for a power-of-two number of chips.

  3-D slices grow from ``2x2x1`` (4 chips) and ``2x2x2`` by doubling the last of their smallest sides
  (``2x2x4``, ``2x4x4``, ``4x4x4``, ``4x4x8``...); 2-D slices likewise from ``1x1``.
  """
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(f"{num_chips} chips is not a power of two")
  if dims == 3:
    if num_chips < 4:
      raise ValueError(f"{num_chips} chips: the smallest 3-D TPU slice has 4 chips")
    if num_chips == 4:
      return (2, 2, 1)
    shape = [2, 2, 2]
  else:
    shape = [1] * dims
  while math.prod(shape) < num_chips:
    smallest = min(shape)
    last = max(i for i, side in enumerate(shape) if side == smallest)
    shape[last] *= 2
  return tuple(shape)


_SLICE = re.compile(r"(?P<chip>[a-z0-9]+)-(?P<count>\d+)")
_TORUS = re.compile(r"(?P<chip>[a-z0-9]+):(?P<shape>\d+(?:x\d+)+)")
_GPUS = re.compile(r"(?P<count>\d+)\s*x\s*(?P<chip>[a-z0-9-]+)")


def parse_target(spec: str) -> Target:
  """``v5p-256``, ``v5p:4x4x12`` or ``8xH100`` -> Target; a clear error for anything else."""
  text = spec.strip().lower()
  known = (f"TPU slices {sorted(TPU_CHIPS)} as NAME-COUNT (v5p-256) or NAME:AxBxC (v5p:4x4x12); "
           f"GPUs as COUNTxGPU with GPU in {sorted(GPU_CHIPS)} (8xH100)")
  if match := _GPUS.fullmatch(text):
    chip = GPU_CHIPS.get(match["chip"])
    if chip is None:
      raise ValueError(f"target {spec!r}: unknown GPU {match['chip']!r}; known: {known}")
    return Target(spec, chip, _positive(spec, int(match["count"])))
  if match := _TORUS.fullmatch(text):
    chip = _tpu_chip(spec, match["chip"], known)
    torus = tuple(int(side) for side in match["shape"].split("x"))
    if len(torus) != chip.torus_dims or min(torus) < 1:
      raise ValueError(f"target {spec!r}: a {chip.name} slice has {chip.torus_dims} positive "
                       f"sides, e.g. {'x'.join(['4'] * chip.torus_dims)}")
    return Target(spec, chip, math.prod(torus), torus)
  if match := _SLICE.fullmatch(text):
    chip = _tpu_chip(spec, match["chip"], known)
    count = _positive(spec, int(match["count"]))
    if count % chip.cores_per_chip_in_name:
      raise ValueError(f"target {spec!r}: {chip.name} slice names count TensorCores, "
                       f"{chip.cores_per_chip_in_name} per chip; {count} is not a multiple")
    num_chips = count // chip.cores_per_chip_in_name
    try:
      torus = standard_torus(num_chips, chip.torus_dims)
    except ValueError as e:
      raise ValueError(f"target {spec!r}: {e}; give the slice's shape, e.g. "
                       f"{match['chip']}:{'x'.join(['4'] * chip.torus_dims)}") from e
    return Target(spec, chip, num_chips, torus)
  raise ValueError(f"target {spec!r} not understood; expected {known}")


def _tpu_chip(spec: str, name: str, known: str) -> Chip:
  if name not in TPU_CHIPS:
    raise ValueError(f"target {spec!r}: unknown TPU {name!r}; known: {known}")
  return TPU_CHIPS[name]


def _positive(spec: str, count: int) -> int:
  if count < 1:
    raise ValueError(f"target {spec!r}: the chip count must be at least 1")
  return count
