"""What a TPU accelerator type name means: generation, chips, hosts, runtime image and zones.

``gcloud`` would reject a bad slice too, but only after a quota check and often minutes into a
queued request; checking the name here turns a typo (``v5p-12``, ``v5e-16`` for ``v5litepod-16``)
into an immediate error that says what would have been valid.

Sources (Cloud TPU documentation, 2025): the runtime image per generation ("TPU software
versions"), the slice shapes and hosts per slice (the v4 / v5e / v5p / v6e pages) and the zones
("TPU regions and zones"). The zone lists go stale as capacity is added, which is why the command
line offers ``--skip_zone_check``; the service itself has the last word.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation as ``gcloud`` names and sizes it."""
  name: str
  # The accelerator-type prefix: "v5litepod-16" is a v5e slice.
  type_prefix: str
  # The runtime (boot) image recommended for JAX on this generation.
  runtime_version: str
  # v4 and v5p type names count TensorCores (two per chip); v5e and v6e names count chips.
  cores_per_chip: int
  # Chips of one host in a multi-host slice; slices up to ``single_host_chips`` fit on one host.
  chips_per_host: int
  single_host_chips: int
  # The counts (the number in the type name) a slice of this generation can have.
  valid_counts: Collection[int]
  valid_counts_text: str
  zones: tuple[str, ...]


_SMALL_POD_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)

GENERATIONS: dict[str, TpuGeneration] = {g.name: g for g in (
    TpuGeneration(
        name="v4", type_prefix="v4", runtime_version="tpu-ubuntu2204-base", cores_per_chip=2,
        chips_per_host=4, single_host_chips=4, valid_counts=range(8, 8192 + 1, 8),
        valid_counts_text="a multiple of 8 from 8 to 8192 (TensorCores; 4 chips per host)",
        zones=("us-central2-b",)),
    TpuGeneration(
        name="v5e", type_prefix="v5litepod", runtime_version="v2-alpha-tpuv5-lite",
        cores_per_chip=1, chips_per_host=4, single_host_chips=8, valid_counts=_SMALL_POD_COUNTS,
        valid_counts_text="one of 1, 4, 8, 16, 32, 64, 128, 256 (chips)",
        zones=("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a", "us-west4-b",
               "us-east5-a", "us-east5-b", "us-east5-c", "europe-west4-b")),
    TpuGeneration(
        name="v5p", type_prefix="v5p", runtime_version="v2-alpha-tpuv5", cores_per_chip=2,
        chips_per_host=4, single_host_chips=4, valid_counts=range(8, 12288 + 1, 8),
        valid_counts_text="a multiple of 8 from 8 to 12288 (TensorCores; 4 chips per host)",
        zones=("us-central1-a", "us-east5-a", "us-east5-b", "us-east5-c", "us-south1-a",
               "us-east1-d", "europe-west4-b")),
    TpuGeneration(
        name="v6e", type_prefix="v6e", runtime_version="v2-alpha-tpuv6e", cores_per_chip=1,
        chips_per_host=4, single_host_chips=8, valid_counts=_SMALL_POD_COUNTS,
        valid_counts_text="one of 1, 4, 8, 16, 32, 64, 128, 256 (chips)",
        zones=("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "us-east5-c",
               "us-east4-a", "us-east4-b", "us-west1-c", "europe-west4-a")),
)}

_BY_PREFIX = {g.type_prefix: g for g in GENERATIONS.values()}
# Names people reach for that gcloud does not accept, and what they mean.
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A validated accelerator type: ``v4-32`` is 16 chips on 4 hosts."""
  accelerator_type: str
  generation: TpuGeneration
  chips: int
  num_workers: int

  @property
  def runtime_version(self) -> str:
    return self.generation.runtime_version


def parse_accelerator_type(accelerator_type: str) -> TpuSlice:
  """``"v5p-64"`` → the slice it names; a clear ``ValueError`` for anything gcloud would refuse."""
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type.strip())
  known = ", ".join(f"{g.type_prefix}-N ({g.name})" for g in GENERATIONS.values())
  if not match:
    raise ValueError(f"accelerator type {accelerator_type!r}: expected NAME-COUNT, one of {known}")
  prefix, count = match.group(1), int(match.group(2))
  if prefix in _ALIASES:
    raise ValueError(f"accelerator type {accelerator_type!r}: gcloud calls it "
                     f"{_ALIASES[prefix]}-{count}")
  generation = _BY_PREFIX.get(prefix)
  if generation is None:
    raise ValueError(f"accelerator type {accelerator_type!r}: unknown TPU generation {prefix!r}; "
                     f"supported: {known}")
  if count not in generation.valid_counts:
    raise ValueError(f"accelerator type {accelerator_type!r}: a {generation.name} slice's count must "
                     f"be {generation.valid_counts_text}")
  chips = count // generation.cores_per_chip
  workers = 1 if chips <= generation.single_host_chips else chips // generation.chips_per_host
  return TpuSlice(accelerator_type=f"{prefix}-{count}", generation=generation, chips=chips,
                  num_workers=workers)


def check_zone(tpu_slice: TpuSlice, zone: str) -> None:
  """Raises if ``zone`` is not among the zones the documentation lists for the slice's generation."""
  generation = tpu_slice.generation
  if zone not in generation.zones:
    raise ValueError(
        f"zone {zone!r} does not offer TPU {generation.name} according to this tool's table "
        f"({', '.join(generation.zones)}); if it does now, check with `gcloud compute tpus "
        f"accelerator-types list --zone={zone}` and pass --skip_zone_check")
