"""Devices to compile for without owning them: simulated CPU devices, or libtpu's compile-only TPUs.

* ``cpu``: XLA's CPU client split into as many devices as the target has chips
  (``--xla_force_host_platform_device_count``). The SPMD partitioner produces the same per-device
  program a TPU would run, but the CPU compiler lays out, fuses and rematerialises differently, so
  its memory figures are an estimate of the TPU's.
* ``tpu``: with ``libtpu`` importable, ``jax.experimental.topologies`` describes the slice's real chips
  and torus, and the TPU compiler itself compiles the step for them on this machine. Its memory
  analysis is the one a run on that slice would get, and Pallas kernels (splash attention) are
  compiled by Mosaic as on the slice. libtpu's one-process-per-machine lock guards real chips;
  compile-only devices touch none, so plans lift it and may run side by side.

jax is imported when devices are made, not with this module: ``medllama-plan`` checks its arguments
(targets, compilers) before paying for jax.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from medllama_jax.plan.topology import Target

if TYPE_CHECKING:
  import jax

COMPILERS = ("auto", "cpu", "tpu")
DESCRIPTIONS = {
    "cpu": "XLA CPU compiler on simulated devices: the same SPMD program, but TPU layouts, fusion "
           "and rematerialisation differ, so memory is an estimate",
    "tpu": "TPU compiler (libtpu, compile-only devices of the real slice topology): the memory a run "
           "on that slice gets",
}
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# The CPU executable is never run, and XLA assigns buffers (the memory figures) before LLVM generates
# code: skipping LLVM's optimisations halves the compile time and changes none of the figures.
COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}, "tpu": {}}


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def choose_compiler(requested: str, target: Target) -> str:
  """``auto`` takes the TPU compiler for TPU targets when libtpu is installed, else the CPU one."""
  if requested not in COMPILERS:
    raise ValueError(f"compiler {requested!r} is not one of {COMPILERS}")
  if requested == "auto":
    return "tpu" if target.chip.is_tpu and libtpu_available() else "cpu"
  if requested == "tpu":
    if not target.chip.is_tpu:
      raise ValueError(f"compiler 'tpu' cannot compile for {target.spec} ({target.chip.name}); "
                       "use the 'cpu' estimate")
    if not libtpu_available():
      raise ValueError("compiler 'tpu' needs libtpu in this Python environment (the version jax "
                       "pins: pip install 'jax[tpu]' in a separate environment); "
                       "or use the 'cpu' estimate")
  return requested


def prepare_backend(num_cpu_devices: int) -> None:
  """Before jax starts its backends: the CPU platform only, split into ``num_cpu_devices`` devices.

  Without effect in a process whose backends already started; ``cpu_devices`` then says whether
  there are enough.
  """
  import jax

  jax.config.update("jax_platforms", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if _DEVICE_COUNT_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={num_cpu_devices}".strip()


def cpu_devices(count: int) -> list[jax.Device]:
  import jax

  devices = jax.devices("cpu")
  if len(devices) < count:
    raise RuntimeError(
        f"the plan needs {count} CPU devices to stand for the target's chips but this process has "
        f"{len(devices)}: run medllama-plan in a fresh process (it sets XLA_FLAGS="
        f"{_DEVICE_COUNT_FLAG}=N itself) or raise that flag in XLA_FLAGS")
  return devices[:count]


def tpu_devices(target: Target) -> list[jax.Device]:
  """Compile-only devices of the slice: libtpu's description of its chips and torus, no hardware."""
  from jax.experimental import topologies

  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask on this machine
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips to guard with the lock
  description = topologies.get_topology_desc(
      platform="tpu", topology_name=target.tpu_topology_name,
      chip_config_name=target.chip.chip_config,
      chips_per_host_bounds=target.chips_per_host_bounds, num_slices=1)
  devices = list(description.devices)
  if len(devices) != target.num_chips:
    raise RuntimeError(f"libtpu describes {target.tpu_topology_name} with {len(devices)} devices, "
                       f"expected {target.num_chips}")
  return devices


def devices_for(compiler: str, target: Target) -> list[jax.Device]:
  return tpu_devices(target) if compiler == "tpu" else cpu_devices(target.num_chips)
