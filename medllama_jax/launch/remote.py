"""The shell scripts that run on every worker: install, launch, stop, status, follow the log.

They are the same whether a worker is a TPU VM (reached with ``gcloud ... ssh --worker=all``) or a
GPU node (plain ``ssh``); only the transport differs (``tpu.py``, ``hosts.py``). Each script is one
string handed to the remote login shell as ``bash -c '<script>'``; every value inside it goes
through ``shlex.quote``, so paths and gin values with spaces or quotes arrive byte for byte.

Remote layout, relative to the remote user's home folder (``RemoteLayout``):
``medllama-jax/`` the code, ``medllama-venv/`` its virtual environment, and
``medllama-runs/RUN_NAME/{train.log,train.pid}`` for each launched run. The checkpoints and
metrics do not live there: they go to the run directory given to the trainer (``gs://...``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence

TRAINER = "medllama-train"
UV_INSTALLER = "https://astral.sh/uv/install.sh"

_GIN_NAME = re.compile(r"[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class RemoteLayout:
  """Where code, environment and run logs live on each worker (relative to its home folder)."""
  code_dir: str = "medllama-jax"
  venv_dir: str = "medllama-venv"
  runs_dir: str = "medllama-runs"

  @property
  def trainer(self) -> str:
    return f"{self.venv_dir}/bin/{TRAINER}"

  def log_file(self, run_name: str) -> str:
    return f"{self.runs_dir}/{run_name}/train.log"

  def pid_file(self, run_name: str) -> str:
    return f"{self.runs_dir}/{run_name}/train.pid"


def check_run_name(run_name: str) -> str:
  """Run names become a folder name on every worker: letters, digits, ``.``, ``_``, ``-``."""
  if not _RUN_NAME.fullmatch(run_name):
    raise ValueError(f"run name {run_name!r}: use letters, digits, '.', '_' and '-' "
                     "(it names a folder on every worker)")
  return run_name


@dataclasses.dataclass(frozen=True)
class GinOverride:
  """One ``--gin.NAME=VALUE`` flag of ``medllama-train`` (a binding ``NAME = VALUE``)."""
  name: str
  value: str

  @property
  def flag(self) -> str:
    return f"--gin.{self.name}={self.value}"

  def string_value(self) -> str | None:
    """The text of a gin string literal (``"gs://b/r"`` → ``gs://b/r``); None if not a string."""
    if len(self.value) >= 2 and self.value[0] == self.value[-1] and self.value[0] in "\"'":
      return self.value[1:-1]
    return None


def parse_gin_override(flag: str) -> GinOverride:
  """``--gin.NAME=VALUE`` → ``GinOverride``; a ``ValueError`` naming the flag otherwise."""
  body = flag[len("--gin."):] if flag.startswith("--gin.") else None
  name, sep, value = (body or "").partition("=")
  if body is None or not sep or not _GIN_NAME.fullmatch(name) or not value.strip():
    raise ValueError(f"{flag!r}: expected --gin.NAME=VALUE, e.g. --gin.train.total_steps=1000 "
                     "or --gin.RUN_DIR='\"gs://bucket/run\"' (strings keep their inner quotes)")
  return GinOverride(name, value)


def check_run_dir(overrides: Sequence[GinOverride], require_gcs: bool) -> str:
  """The run directory bound on the command line, checked before any worker starts.

  Every process of a multi-host run writes its shards of each checkpoint into the same folder, so
  it must be one folder they all see; on TPU VMs that is a ``gs://`` bucket (``require_gcs``), which
  also outlives the VMs.
  """
  bound = [o for o in overrides if o.name == "RUN_DIR" or o.name.endswith("run_dir")]
  if not bound:
    raise ValueError("no run directory: pass --gin.RUN_DIR='\"gs://BUCKET/runs/NAME\"' (the "
                     "recipes bind train.run_dir to the RUN_DIR macro)")
  for override in bound:
    path = override.string_value()
    if path is None:
      raise ValueError(f"{override.flag!r}: a gin string needs its inner quotes, e.g. "
                       f"--gin.{override.name}='\"{override.value}\"'")
    if require_gcs and not path.startswith("gs://"):
      raise ValueError(f"{override.flag!r}: every worker writes to the run directory and the VMs' "
                       "disks go away with them: use a gs:// path (a single-worker slice may keep "
                       "it on its disk: launch --local_run_dir)")
  return bound[-1].string_value()


def trainer_args(gin_files: Sequence[str], overrides: Sequence[GinOverride]) -> list[str]:
  """The ``medllama-train`` arguments: gin files in order, then the bindings (which win)."""
  if not gin_files:
    raise ValueError("give at least one --gin_file (e.g. gin/pretrain_me_llama_13b.gin)")
  return [*(f"--gin_file={f}" for f in gin_files), *(o.flag for o in overrides)]


def check_env(env: Mapping[str, str]) -> Mapping[str, str]:
  for name in env:
    if not _ENV_NAME.fullmatch(name):
      raise ValueError(f"environment variable name {name!r}: letters, digits and '_' only")
  return env


def parse_env(assignments: Sequence[str]) -> dict[str, str]:
  """``["A=1", "B=x y"]`` → ``{"A": "1", "B": "x y"}``; later assignments win."""
  env = {}
  for assignment in assignments:
    name, sep, value = assignment.partition("=")
    if not sep:
      raise ValueError(f"{assignment!r}: expected NAME=VALUE")
    env[name] = value
  return dict(check_env(env))


def bash_command(script: str) -> str:
  """The single string ssh gives the remote login shell: run ``script`` with bash."""
  return "bash -c " + shlex.quote(script)


def _home(path: str) -> str:
  """A shell word for ``$HOME/path`` (the scripts ``cd`` elsewhere, so paths are absolute)."""
  return '"$HOME"/' + shlex.quote(path)


# What ``install`` reports per worker, read from package metadata (importing jax takes seconds).
_VERSIONS = shlex.quote("import importlib.metadata as m; "
                        "print(*(f'{p} {m.version(p)}' for p in ('medllama-jax', 'jax')))")

_PRELUDE = 'set -euo pipefail\ncd "$HOME"\nhost=$(hostname)'


def _alive_function(layout: RemoteLayout, run_name: str) -> str:
  """``alive``: true when the run's pid file names a live ``medllama-train`` (a recycled pid of
  some other program does not count); sets ``pid``."""
  pid_file = _home(layout.pid_file(run_name))
  return "\n".join([
      "alive() {",
      f"  [ -s {pid_file} ] || return 1",
      f"  pid=$(cat {pid_file})",
      '  kill -0 "$pid" 2>/dev/null || return 1',
      "  cmdline=$(tr '\\0' ' ' 2>/dev/null < \"/proc/$pid/cmdline\") || return 1",
      f'  case "$cmdline" in *{TRAINER}*) return 0 ;; *) return 1 ;; esac',
      "}",
  ])


@dataclasses.dataclass(frozen=True)
class GitSource:
  """Code from a git repository the workers can clone (``ref``: branch, tag or commit)."""
  url: str
  ref: str

  def fetch(self, target_dir: str) -> str:
    return (f"git clone --quiet {shlex.quote(self.url)} {shlex.quote(target_dir)}\n"
            f"git -C {shlex.quote(target_dir)} checkout --quiet {shlex.quote(self.ref)}")


@dataclasses.dataclass(frozen=True)
class ArchiveSource:
  """Code from a ``.tar.gz`` of the source tree already copied to each worker (at ``path``)."""
  path: str

  def fetch(self, target_dir: str) -> str:
    return (f"mkdir -p {shlex.quote(target_dir)}\n"
            f"tar -xzf {shlex.quote(self.path)} -C {shlex.quote(target_dir)}")


def install_script(source: GitSource | ArchiveSource, jax_requirement: str,
                   python_version: str = "3.11", layout: RemoteLayout = RemoteLayout()) -> str:
  """Puts the code in ``layout.code_dir`` (replacing what was there) and installs it, with the
  accelerator's JAX build (``jax[tpu]==X`` / ``jax[cuda12]==X``), into ``layout.venv_dir``.

  The TPU images ship Python 3.10 and JAX needs 3.11+, so the environment is made by ``uv``, which
  fetches the requested Python itself. The new tree is unpacked beside the old one and swapped in,
  so a failed fetch leaves the previous install intact.
  """
  staging = f"{layout.code_dir}.new"
  uv = '"$HOME"/.local/bin/uv'
  return "\n".join([
      _PRELUDE,
      f"if [ ! -x {uv} ]; then curl -LsSf {UV_INSTALLER} | "
      f'env UV_INSTALL_DIR="$HOME"/.local/bin INSTALLER_NO_MODIFY_PATH=1 sh; fi',
      f"rm -rf {shlex.quote(staging)}",
      source.fetch(staging),
      f"rm -rf {shlex.quote(layout.code_dir)}",
      f"mv {shlex.quote(staging)} {shlex.quote(layout.code_dir)}",
      f"[ -x {shlex.quote(layout.venv_dir)}/bin/python ] || "
      f"{uv} venv --quiet --python {shlex.quote(python_version)} {shlex.quote(layout.venv_dir)}",
      f"{uv} pip install --quiet --python {shlex.quote(layout.venv_dir)}/bin/python "
      f"-e ./{shlex.quote(layout.code_dir)} {shlex.quote(jax_requirement)}",
      f"echo \"$host: installed $({shlex.quote(layout.venv_dir)}/bin/python -c {_VERSIONS})\"",
  ])


def launch_script(run_name: str, args: Sequence[str], env: Mapping[str, str] | None = None,
                  layout: RemoteLayout = RemoteLayout(), startup_check_s: int = 10) -> str:
  """Starts ``medllama-train args`` in the background, detached from the ssh session.

  ``setsid nohup`` keeps it alive after ssh returns; stdout and stderr (the trainer's console:
  stages and progress) are appended to the run's log (a relaunch after a stop resumes the same run
  and keeps the earlier log), and the trainer's detailed log files go beside it (``--log_dir``). The trainer
  writes its own pid (``sh -c 'echo $$ ...; exec ...'``, so the pid is the trainer's whatever
  setsid does); ``stop`` signals that pid. A run that is still alive is never started twice, and a
  trainer that dies within ``startup_check_s`` seconds (bad flag, import error) fails the launch and
  prints the end of its log.
  """
  check_run_name(run_name)
  log, pid_file = _home(layout.log_file(run_name)), _home(layout.pid_file(run_name))
  exports = [f"export {name}={shlex.quote(value)}" for name, value in check_env(env or {}).items()]
  start = " ".join([
      "setsid nohup sh -c", shlex.quote('echo $$ > "$1"; shift; exec "$@"'), shlex.quote(TRAINER),
      pid_file, _home(layout.trainer), *(shlex.quote(a) for a in args),
      f"--log_dir={_home(f'{layout.runs_dir}/{run_name}')}",
      f">> {log} 2>&1 < /dev/null &"])
  return "\n".join([
      _PRELUDE,
      _alive_function(layout, run_name),
      f"mkdir -p {_home(f'{layout.runs_dir}/{run_name}')}",
      "if alive; then",
      f'  echo "$host: run {run_name} is already running (pid $pid); stop it first" >&2',
      "  exit 1",
      "fi",
      f"rm -f {pid_file}",
      f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) launch on $host" >> {log}',
      f"cd {_home(layout.code_dir)}",
      *exports,
      start,
      f"for _ in $(seq 100); do [ -s {pid_file} ] && break; sleep 0.1; done",
      f"sleep {int(startup_check_s)}",
      "if ! alive; then",
      f'  echo "$host: {TRAINER} exited during start-up; end of {layout.log_file(run_name)}:" >&2',
      f"  tail -n 30 {log} >&2",
      "  exit 1",
      "fi",
      f'echo "$host: started {TRAINER} (pid $pid), log {layout.log_file(run_name)}"',
  ])


def stop_script(run_name: str, wait_s: int, layout: RemoteLayout = RemoteLayout()) -> str:
  """Sends SIGTERM to the run's trainer and waits up to ``wait_s`` seconds for it to exit.

  The trainer treats SIGTERM as a preemption notice: it finishes the step, saves a checkpoint,
  and exits cleanly (relaunching resumes from it). Waiting matters: deleting the slice before the
  save is committed would lose the steps since the previous checkpoint. A run that is not running
  is reported, not an error, so ``stop`` can be repeated.
  """
  check_run_name(run_name)
  return "\n".join([
      _PRELUDE,
      _alive_function(layout, run_name),
      "if ! alive; then",
      f'  echo "$host: run {run_name} is not running"',
      "  exit 0",
      "fi",
      'kill -TERM "$pid"',
      f'echo "$host: sent SIGTERM to {TRAINER} (pid $pid); waiting up to {int(wait_s)} s for its '
      'checkpoint"',
      "ticks=0",
      'while kill -0 "$pid" 2>/dev/null; do',
      f"  if [ \"$ticks\" -ge {5 * int(wait_s)} ]; then",
      f'    echo "$host: pid $pid still running after {int(wait_s)} s" >&2',
      "    exit 1",
      "  fi",
      "  sleep 0.2",
      "  ticks=$((ticks + 1))",
      "done",
      'echo "$host: stopped; end of log:"',
      f"tail -n 3 {_home(layout.log_file(run_name))}",
  ])


def status_script(run_name: str, log_lines: int = 3, layout: RemoteLayout = RemoteLayout()) -> str:
  """One line per worker (running with pid and elapsed time, or not), then its last log lines."""
  check_run_name(run_name)
  log = _home(layout.log_file(run_name))
  return "\n".join([
      _PRELUDE,
      _alive_function(layout, run_name),
      "if alive; then",
      '  echo "$host: running (pid $pid, for $(ps -o etime= -p "$pid" | tr -d \' \'))"',
      "else",
      f'  echo "$host: run {run_name} not running"',
      "fi",
      f'if [ -f {log} ]; then tail -n {int(log_lines)} {log} | sed "s|^|$host   |"; fi',
  ])


def follow_log_script(run_name: str, lines: int = 100, layout: RemoteLayout = RemoteLayout()) -> str:
  """``tail -F`` of one worker's log (follows across a relaunch; Ctrl-C ends it)."""
  check_run_name(run_name)
  return f"tail -n {int(lines)} -F {_home(layout.log_file(run_name))}"


def cat_log_script(run_name: str, layout: RemoteLayout = RemoteLayout()) -> str:
  """The whole log of one worker on stdout (what ``logs --collect`` saves per worker)."""
  check_run_name(run_name)
  return f"cat {_home(layout.log_file(run_name))}"
