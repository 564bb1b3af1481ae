"""``gcloud`` command lines for a TPU VM slice, as argv lists.

A slice is made either directly (``gcloud compute tpus tpu-vm create``) or through a queued
resource of the same name (``queued-resources create --node-id=NAME``), which waits for capacity
instead of failing when the zone is full; either way its workers are then reached as the TPU VM
``NAME``. Remote commands run on every worker at once with ``ssh --worker=all``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

from medllama_jax.launch import remote
from medllama_jax.launch.accelerators import TpuSlice

PROVISIONING = ("on-demand", "spot", "preemptible", "reserved")
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")

Step = list[list[str]]


@dataclasses.dataclass(frozen=True)
class TpuVm:
  """Which slice: its name, zone and (optionally) project; ``queued`` if made by a queued resource."""
  name: str
  zone: str
  project: str | None = None
  queued: bool = False

  def __post_init__(self):
    if not _NAME.fullmatch(self.name):
      raise ValueError(f"TPU name {self.name!r}: lowercase letters, digits and '-', starting with a "
                       "letter, at most 63 characters")
    if not self.zone:
      raise ValueError("a zone is required (e.g. --zone=us-central2-b)")

  def location_flags(self) -> list[str]:
    return [f"--zone={self.zone}", *([f"--project={self.project}"] if self.project else [])]


def _gcloud(*group: str) -> list[str]:
  return ["gcloud", "compute", "tpus", *group]


def create_command(vm: TpuVm, tpu_slice: TpuSlice, provisioning: str = "on-demand") -> list[str]:
  """Creates the slice with the runtime image of its generation."""
  if provisioning not in PROVISIONING:
    raise ValueError(f"provisioning {provisioning!r}: one of {', '.join(PROVISIONING)}")
  model = [] if provisioning == "on-demand" else [f"--{provisioning}"]
  if vm.queued:
    if provisioning == "preemptible":
      raise ValueError("queued resources take --spot or --reserved, not --preemptible")
    return [*_gcloud("queued-resources", "create", vm.name), f"--node-id={vm.name}",
            *vm.location_flags(), f"--accelerator-type={tpu_slice.accelerator_type}",
            f"--runtime-version={tpu_slice.runtime_version}", *model]
  return [*_gcloud("tpu-vm", "create", vm.name), *vm.location_flags(),
          f"--accelerator-type={tpu_slice.accelerator_type}",
          f"--version={tpu_slice.runtime_version}", *model]


def delete_command(vm: TpuVm) -> list[str]:
  """Deletes the slice (with a queued resource, the request and its node); no confirmation prompt."""
  if vm.queued:
    return [*_gcloud("queued-resources", "delete", vm.name), *vm.location_flags(), "--force",
            "--quiet"]
  return [*_gcloud("tpu-vm", "delete", vm.name), *vm.location_flags(), "--quiet"]


def describe_command(vm: TpuVm) -> list[str]:
  """One line: the slice's state (READY...) and health, or the queued request's state."""
  if vm.queued:
    return [*_gcloud("queued-resources", "describe", vm.name), *vm.location_flags(),
            "--format=value(state.state)"]
  return [*_gcloud("tpu-vm", "describe", vm.name), *vm.location_flags(),
          "--format=value(acceleratorType,state,health)"]


def ssh_command(vm: TpuVm, script: str, worker: str = "all") -> list[str]:
  """Runs ``script`` (bash) on ``worker`` (an index, or ``all``: every worker concurrently)."""
  return [*_gcloud("tpu-vm", "ssh", vm.name), *vm.location_flags(), f"--worker={worker}",
          f"--command={remote.bash_command(script)}"]


def scp_to_all_command(vm: TpuVm, local_path: str, remote_path: str) -> list[str]:
  """Copies one local file to ``remote_path`` (relative to home) on every worker."""
  return [*_gcloud("tpu-vm", "scp", local_path, f"{vm.name}:{remote_path}"), *vm.location_flags(),
          "--worker=all"]


def collect_command(vm: TpuVm, script: str, local_dir: str) -> list[str]:
  """Runs ``script`` on every worker and saves each one's stdout as ``local_dir/<worker>.log``."""
  return [*ssh_command(vm, script), f"--output-directory={local_dir}"]


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """Runs the remote scripts on a slice's workers; the JAX runtime finds its peers by itself."""
  vm: TpuVm
  jax_extra = "tpu"
  # Every worker writes the same run directory and the VMs' disks go with them: gs:// only.
  require_gcs_run_dir = True

  def everywhere(self, build: Callable[[Mapping[str, str]], str]) -> Step:
    """One ``ssh --worker=all``: every worker runs ``build({})`` (no per-process environment)."""
    return [ssh_command(self.vm, build({}))]

  def on(self, worker: int, script: str) -> Step:
    return [ssh_command(self.vm, script, str(worker))]

  def upload(self, local_path: str, remote_path: str) -> Step:
    return [scp_to_all_command(self.vm, local_path, remote_path)]

  def collect_logs(self, run_name: str, local_dir: str,
                   layout: remote.RemoteLayout = remote.RemoteLayout()) -> list[Step]:
    """``local_dir/<worker>.log``: each worker's log of the run."""
    return [[["mkdir", "-p", local_dir]],
            [collect_command(self.vm, remote.cat_log_script(run_name, layout), local_dir)]]
