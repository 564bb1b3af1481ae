"""The same launch on GPU nodes reached with plain ``ssh``: one trainer process per node.

On a TPU slice JAX finds its peers by itself. On GPU nodes ``partitioning.initialize_distributed``
joins the processes when ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0, which serves
the coordination service), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are set; each process
then drives all GPUs of its node. So the launch differs from the TPU one only in those three
variables, different for each node, which is why ``everywhere`` builds a script per node. The
commands of one step run at the same time (a stop signals every node together).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from medllama_jax.launch import remote

Step = list[list[str]]


def ssh_command(host: str, script: str) -> list[str]:
  return ["ssh", host, remote.bash_command(script)]


@dataclasses.dataclass(frozen=True)
class GpuHosts:
  """The nodes of a run, in process order (``[user@]host`` as ssh takes them; the first hosts the
  coordinator); ``jax_extra`` picks the JAX build installed on them (``cuda12`` / ``cuda13``)."""
  hosts: tuple[str, ...]
  coordinator_port: int = 8476
  # The coordinator's address as the other nodes reach it, if not the first ssh host name.
  coordinator_host: str | None = None
  jax_extra: str = "cuda12"
  # A shared filesystem path (NFS, Lustre...) is as good as a bucket here.
  require_gcs_run_dir = False

  def __post_init__(self):
    if not self.hosts:
      raise ValueError("give at least one host (--hosts node0,node1,...)")
    for host in self.hosts:
      if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"host {host!r}: expected [user@]hostname")
    if len(set(self.hosts)) != len(self.hosts):
      raise ValueError(f"hosts {list(self.hosts)}: each node once (one process per node)")
    if not 0 < self.coordinator_port < 65536:
      raise ValueError(f"coordinator port {self.coordinator_port}: expected 1-65535")

  @property
  def coordinator_address(self) -> str:
    host = self.coordinator_host or self.hosts[0].rpartition("@")[2]
    return f"{host}:{self.coordinator_port}"

  def process_env(self, index: int) -> dict[str, str]:
    """What ``initialize_distributed`` reads on node ``index``."""
    return {"JAX_COORDINATOR_ADDRESS": self.coordinator_address,
            "JAX_NUM_PROCESSES": str(len(self.hosts)), "JAX_PROCESS_ID": str(index)}

  def everywhere(self, build: Callable[[Mapping[str, str]], str]) -> Step:
    """One ssh per node, at the same time; node ``i`` runs ``build(process_env(i))``."""
    return [ssh_command(host, build(self.process_env(i))) for i, host in enumerate(self.hosts)]

  def on(self, index: int, script: str) -> Step:
    if not 0 <= index < len(self.hosts):
      raise ValueError(f"node {index}: there are {len(self.hosts)} hosts (0-{len(self.hosts) - 1})")
    return [ssh_command(self.hosts[index], script)]

  def upload(self, local_path: str, remote_path: str) -> Step:
    return [["scp", local_path, f"{host}:{remote_path}"] for host in self.hosts]

  def collect_logs(self, run_name: str, local_dir: str,
                   layout: remote.RemoteLayout = remote.RemoteLayout()) -> list[Step]:
    """``local_dir/<node>.log``: each node's log of the run."""
    remote.check_run_name(run_name)
    return [[["mkdir", "-p", local_dir]],
            [["scp", f"{host}:{layout.log_file(run_name)}", f"{local_dir}/{i}.log"]
             for i, host in enumerate(self.hosts)]]
