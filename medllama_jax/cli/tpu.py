"""``medllama_tpu.py``: create a TPU slice, install, launch ``medllama-train`` on every worker,
follow or collect the logs, stop with a checkpoint, delete. Each command is printed before it
runs; ``--dry_run`` only prints.

  medllama_tpu.py create  --tpu me-llama --zone us-central2-b --accelerator_type v4-32 [--spot]
  medllama_tpu.py install --tpu me-llama --zone us-central2-b --git_url URL --git_ref main
                          (or --archive medllama-jax.tar.gz, from `git archive -o ... HEAD`)
  medllama_tpu.py launch  --tpu me-llama --zone us-central2-b --run_name 13b \\
      --gin_file gin/pretrain_me_llama_13b.gin --gin.RUN_DIR='"gs://BUCKET/runs/13b"' \\
      --gin.DATA_DIR='"gs://BUCKET/data"' --gin.INIT_CHECKPOINT='"gs://BUCKET/llama2-13b"'
  medllama_tpu.py logs    --tpu me-llama --zone us-central2-b --run_name 13b [--collect DIR]
  medllama_tpu.py status  --tpu me-llama --zone us-central2-b --run_name 13b
  medllama_tpu.py stop    --tpu me-llama --zone us-central2-b --run_name 13b
  medllama_tpu.py delete  --tpu me-llama --zone us-central2-b

GPU nodes instead of a slice: ``--hosts node0,node1`` in place of ``--tpu/--zone`` (install,
launch, logs, status, stop); each node gets the ``JAX_*`` variables that join the processes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import sys
import tarfile
from collections.abc import Sequence

from absl import logging

from medllama_jax.cli import console
from medllama_jax.launch import accelerators, hosts, remote, runner, tpu

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
REMOTE_ARCHIVE = "medllama-jax.tar.gz"
TPU_ONLY = ("create", "delete")

Target = tpu.TpuTarget | hosts.GpuHosts


def _target_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  where = parser.add_argument_group("where (a TPU slice, or GPU nodes with --hosts)")
  where.add_argument("--tpu", help="TPU VM (slice) name")
  where.add_argument("--zone", help="zone of the slice, e.g. us-central2-b")
  where.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  where.add_argument("--queued", action="store_true",
                     help="the slice is (to be) made through a queued resource of the same name")
  where.add_argument("--hosts", help="GPU nodes, comma-separated [user@]host, in process order")
  where.add_argument("--coordinator_host", help="address of the first node as the others reach it")
  where.add_argument("--coordinator_port", type=int, default=8476)
  where.add_argument("--cuda", choices=("cuda12", "cuda13"), default="cuda12",
                     help="JAX build installed on GPU nodes")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  console.add_console_flags(parser, subcommand=True)
  return parser


def _run_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--run_name", required=True,
                      help="names the run's log folder on every worker (medllama-runs/RUN_NAME)")
  return parser


def build_parser() -> console.ArgumentParser:
  parser = console.make_parser("medllama_tpu.py", __doc__)
  parser.allow_abbrev = False
  commands = parser.add_subparsers(dest="command", required=True)
  target, run = _target_parser(), _run_parser()

  create = commands.add_parser("create", parents=[target], allow_abbrev=False,
                               help="create the TPU slice")
  create.add_argument("--accelerator_type", required=True, help="v4-32, v5litepod-16, v5p-64...")
  create.add_argument("--provisioning", choices=tpu.PROVISIONING, default="on-demand")
  create.add_argument("--spot", dest="provisioning", action="store_const", const="spot",
                      help="same as --provisioning=spot")
  create.add_argument("--skip_zone_check", action="store_true",
                      help="trust --zone even if this tool's zone table does not list it")
  commands.add_parser("delete", parents=[target], allow_abbrev=False, help="delete the TPU slice")

  install = commands.add_parser("install", parents=[target], allow_abbrev=False,
                                help="put the code and its environment on every worker")
  source = install.add_mutually_exclusive_group(required=True)
  source.add_argument("--git_url", help="repository every worker clones")
  source.add_argument("--archive", help=".tar.gz of the source tree (setup.py at its top), copied "
                      "to every worker: `git archive --format=tar.gz -o medllama-jax.tar.gz HEAD`")
  install.add_argument("--git_ref", default="main", help="branch, tag or commit (with --git_url)")
  install.add_argument("--python_version", default="3.11")
  install.add_argument("--jax_version", default=importlib.metadata.version("jax"),
                       help="JAX version for the workers (default: the one installed here)")

  launch = commands.add_parser("launch", parents=[target, run], allow_abbrev=False,
                               help="start medllama-train on every worker (extra flags: "
                               "--gin.NAME=VALUE bindings, as medllama-train takes them)")
  launch.add_argument("--gin_file", action="append", default=[], required=True,
                      help="gin file, relative to the repository or its gin/ folder (repeatable)")
  launch.add_argument("--env", action="append", default=[],
                      help="NAME=VALUE set for the trainer (repeatable)")
  launch.add_argument("--local_run_dir", action="store_true",
                      help="the slice has a single worker: accept a run directory on its disk "
                      "(deleted with the VM) instead of gs://")
  launch.add_argument("--startup_check_s", type=int, default=10,
                      help="seconds after which the trainer must still be alive")

  logs_cmd = commands.add_parser("logs", parents=[target, run], allow_abbrev=False,
                                 help="follow one worker's log, or collect every worker's")
  logs_cmd.add_argument("--worker", type=int, default=0, help="worker (node) to follow")
  logs_cmd.add_argument("--lines", type=int, default=100, help="lines of history before following")
  logs_cmd.add_argument("--collect", metavar="DIR",
                        help="save each worker's whole log as DIR/<worker>.log instead")

  stop = commands.add_parser("stop", parents=[target, run], allow_abbrev=False,
                             help="SIGTERM the trainer everywhere: it saves a checkpoint and exits")
  stop.add_argument("--wait_s", type=int, default=1800,
                    help="how long to wait for the checkpoint and exit")
  commands.add_parser("status", parents=[target, run], allow_abbrev=False,
                      help="slice state, and whether the trainer runs on each worker")
  return parser


def make_target(args: argparse.Namespace) -> Target:
  """The slice (``--tpu``/``--zone``) or the GPU nodes (``--hosts``) named on the command line."""
  if bool(args.tpu) == bool(args.hosts):
    raise ValueError("name either a TPU slice (--tpu NAME --zone ZONE) or GPU nodes (--hosts ...)")
  if args.tpu:
    return tpu.TpuTarget(tpu.TpuVm(args.tpu, args.zone or "", args.project, args.queued))
  if args.command in TPU_ONLY:
    raise ValueError(f"{args.command} works on TPU slices (--tpu); GPU nodes are managed elsewhere")
  return hosts.GpuHosts(tuple(h.strip() for h in args.hosts.split(",")),
                        coordinator_port=args.coordinator_port,
                        coordinator_host=args.coordinator_host, jax_extra=args.cuda)


def check_source_archive(path: str) -> None:
  """The archive must hold the source tree at its top (``setup.py``), as ``git archive`` writes it."""
  if not pathlib.Path(path).is_file():
    raise ValueError(f"--archive {path}: no such file")
  try:
    with tarfile.open(path, "r:gz") as archive:
      names = {name.removeprefix("./") for name in archive.getnames()}
  except (tarfile.TarError, OSError) as e:
    raise ValueError(f"--archive {path}: not a readable .tar.gz ({e})") from e
  if "setup.py" not in names:
    raise ValueError(f"--archive {path}: no setup.py at the top of the archive (make it with "
                     "`git archive --format=tar.gz -o medllama-jax.tar.gz HEAD`)")


def check_gin_files(gin_files: Sequence[str], root: pathlib.Path = PROJECT_ROOT) -> None:
  """Each gin file must exist in this checkout, where the workers' copy will look for it too."""
  for name in gin_files:
    if not any((base / name).is_file() for base in (root, root / "gin")):
      raise ValueError(f"gin file {name}: not found in {root} nor {root / 'gin'} (workers resolve "
                       "it the same way inside their copy of the code)")


def default_env(target: Target) -> dict[str, str]:
  """Unbuffered Python output (the log follows the run); on TPU, libtpu's errors on stderr and
  JAX's own discovery of the slice's workers (``partitioning.initialize_distributed``)."""
  env = {"PYTHONUNBUFFERED": "1"}
  if isinstance(target, tpu.TpuTarget):
    env["TPU_STDERR_LOG_LEVEL"] = "2"
    env["MEDLLAMA_DISTRIBUTED"] = "auto"  # partitioning.AUTO_DISTRIBUTED_ENV (JAX not imported here)
  return env


def build_plan(args: argparse.Namespace, gin_flags: Sequence[str]) -> list[runner.Step]:
  """The commands of one subcommand, checked and built without running anything."""
  target = make_target(args)
  if gin_flags and args.command != "launch":
    raise ValueError(f"{gin_flags[0]!r}: --gin.NAME=VALUE bindings go with launch")
  if args.command == "create":
    tpu_slice = accelerators.parse_accelerator_type(args.accelerator_type)
    if not args.skip_zone_check:
      accelerators.check_zone(tpu_slice, target.vm.zone)
    logging.info("%s: %d chips on %d worker(s), runtime image %s", tpu_slice.accelerator_type,
                 tpu_slice.chips, tpu_slice.num_workers, tpu_slice.runtime_version)
    return [[tpu.create_command(target.vm, tpu_slice, args.provisioning)]]
  if args.command == "delete":
    return [[tpu.delete_command(target.vm)]]
  if args.command == "install":
    return _install_plan(args, target)
  if args.command == "launch":
    return _launch_plan(args, target, gin_flags)
  if args.command == "logs":
    if args.collect:
      return target.collect_logs(remote.check_run_name(args.run_name), args.collect)
    if args.worker < 0 or args.lines < 0:
      raise ValueError(f"--worker {args.worker} --lines {args.lines}: expected 0 or more")
    return [target.on(args.worker, remote.follow_log_script(args.run_name, args.lines))]
  if args.command == "stop":
    return [target.everywhere(lambda _: remote.stop_script(args.run_name, args.wait_s))]
  status = [target.everywhere(lambda _: remote.status_script(args.run_name))]
  if isinstance(target, tpu.TpuTarget):
    return [[tpu.describe_command(target.vm)], *status]
  return status


def _install_plan(args: argparse.Namespace, target: Target) -> list[runner.Step]:
  jax_requirement = f"jax[{target.jax_extra}]=={args.jax_version}"
  if args.archive:
    check_source_archive(args.archive)
    source, plan = remote.ArchiveSource(REMOTE_ARCHIVE), [target.upload(args.archive, REMOTE_ARCHIVE)]
  else:
    source, plan = remote.GitSource(args.git_url, args.git_ref), []
  script = remote.install_script(source, jax_requirement, args.python_version)
  return [*plan, target.everywhere(lambda _: script)]


def _launch_plan(args: argparse.Namespace, target: Target,
                 gin_flags: Sequence[str]) -> list[runner.Step]:
  remote.check_run_name(args.run_name)
  overrides = [remote.parse_gin_override(flag) for flag in gin_flags]
  run_dir = remote.check_run_dir(overrides, target.require_gcs_run_dir and not args.local_run_dir)
  check_gin_files(args.gin_file)
  train_args = remote.trainer_args(args.gin_file, overrides)
  env = {**default_env(target), **remote.parse_env(args.env)}
  logging.info("run %s: checkpoints and metrics in %s", args.run_name, run_dir)
  return [target.everywhere(lambda process_env: remote.launch_script(
      args.run_name, train_args, {**env, **process_env}, startup_check_s=args.startup_check_s))]


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(other arguments, ``--gin.*`` arguments): the bindings are passed to the trainer as given."""
  gin = [a for a in argv if a.startswith("--gin.")]
  return [a for a in argv if not a.startswith("--gin.")], gin


def _run_command(args: argparse.Namespace, gin_flags: Sequence[str]) -> int:
  """Builds the subcommand's plan and runs it; the exit status of a failed remote command is
  passed on."""
  try:
    plan = build_plan(args, gin_flags)
  except ValueError as e:
    raise console.UsageError(f"{args.command}: {e}") from e
  try:
    runner.run_plan(plan, args.dry_run)
  except FileNotFoundError as e:
    raise console.UsageError(f"{args.command}: {e.filename}: not found (gcloud comes with the "
                             "Google Cloud CLI; ssh/scp with OpenSSH)") from e
  except runner.CommandFailed as e:
    print(f"medllama_tpu.py {args.command}: {e}", file=sys.stderr)
    return e.returncode if 0 < e.returncode < 256 else 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, gin_flags = split_gin_flags(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  return console.run(parser.prog, args, lambda: _run_command(args, gin_flags))


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
