"""TPU / GPU launch tooling: the exact gcloud/ssh argv of every command, input checks, the dry run,
and the remote scripts themselves, run here with bash against a stand-in trainer (launch, status,
SIGTERM stop, relaunch refusal, install from an archive and from git)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from medllama_jax.cli import tpu as cli
from medllama_jax.launch import accelerators, hosts, remote, runner, tpu

VM = tpu.TpuVm("me-llama", "us-central2-b")
VM_P = tpu.TpuVm("me-llama", "us-east5-a", project="proj", queued=True)
GCLOUD_TPU = ["gcloud", "compute", "tpus"]
# Values a shell would mangle if any quoting layer were wrong.
NASTY = ["--gin.RUN_DIR=\"gs://b/runs/a b\"", "--gin.NOTE='it''s \"quoted\" $HOME `x` \\n'",
         "--gin.train.total_steps=7"]


# ------------------------------------------------------------------------------ accelerator types

@pytest.mark.parametrize("name, generation, chips, workers, image", [
    ("v4-8", "v4", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-128", "v4", 64, 16, "tpu-ubuntu2204-base"),
    ("v5litepod-4", "v5e", 4, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", "v5e", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5e", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", "v5e", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-64", "v5p", 32, 8, "v2-alpha-tpuv5"),
    ("v6e-16", "v6e", 16, 4, "v2-alpha-tpuv6e"),
])
def test_accelerator_type_means_chips_workers_and_image(name, generation, chips, workers, image):
  s = accelerators.parse_accelerator_type(name)
  assert (s.accelerator_type, s.generation.name, s.chips, s.num_workers, s.runtime_version) == (
      name, generation, chips, workers, image)


@pytest.mark.parametrize("name, message", [
    ("v5p-12", "multiple of 8"), ("v4-16384", "multiple of 8 from 8 to 8192"),
    ("v5litepod-12", "one of 1, 4, 8"), ("v5e-16", "gcloud calls it v5litepod-16"),
    ("v3-8", "unknown TPU generation 'v3'"), ("v4", "expected NAME-COUNT"), ("tpu-v4-8", "NAME-COUNT"),
])
def test_bad_accelerator_types_say_what_is_valid(name, message):
  with pytest.raises(ValueError, match=message):
    accelerators.parse_accelerator_type(name)


def test_zone_table():
  accelerators.check_zone(accelerators.parse_accelerator_type("v4-32"), "us-central2-b")
  accelerators.check_zone(accelerators.parse_accelerator_type("v5p-64"), "us-east5-a")
  with pytest.raises(ValueError, match="'us-central2-b' does not offer TPU v5p.*--skip_zone_check"):
    accelerators.check_zone(accelerators.parse_accelerator_type("v5p-64"), "us-central2-b")


# ------------------------------------------------------------------------------ gcloud argv

def test_create_commands_exact():
  v4, v5e, v5p = (accelerators.parse_accelerator_type(t) for t in ("v4-32", "v5litepod-16", "v5p-64"))
  assert tpu.create_command(VM, v4, "spot") == [
      *GCLOUD_TPU, "tpu-vm", "create", "me-llama", "--zone=us-central2-b",
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
  assert tpu.create_command(tpu.TpuVm("e", "us-west4-a", "proj"), v5e, "preemptible") == [
      *GCLOUD_TPU, "tpu-vm", "create", "e", "--zone=us-west4-a", "--project=proj",
      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--preemptible"]
  assert tpu.create_command(tpu.TpuVm("p", "us-east5-a"), v5p) == [
      *GCLOUD_TPU, "tpu-vm", "create", "p", "--zone=us-east5-a", "--accelerator-type=v5p-64",
      "--version=v2-alpha-tpuv5"]
  assert tpu.create_command(VM_P, v5p, "reserved") == [
      *GCLOUD_TPU, "queued-resources", "create", "me-llama", "--node-id=me-llama",
      "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-64",
      "--runtime-version=v2-alpha-tpuv5", "--reserved"]
  with pytest.raises(ValueError, match="queued resources take --spot or --reserved"):
    tpu.create_command(VM_P, v5p, "preemptible")
  with pytest.raises(ValueError, match="provisioning 'cheap'"):
    tpu.create_command(VM, v4, "cheap")


def test_delete_describe_ssh_scp_commands_exact():
  assert tpu.delete_command(VM) == [*GCLOUD_TPU, "tpu-vm", "delete", "me-llama",
                                    "--zone=us-central2-b", "--quiet"]
  assert tpu.delete_command(VM_P) == [*GCLOUD_TPU, "queued-resources", "delete", "me-llama",
                                      "--zone=us-east5-a", "--project=proj", "--force", "--quiet"]
  assert tpu.describe_command(VM) == [*GCLOUD_TPU, "tpu-vm", "describe", "me-llama",
                                      "--zone=us-central2-b",
                                      "--format=value(acceleratorType,state,health)"]
  assert tpu.describe_command(VM_P) == [*GCLOUD_TPU, "queued-resources", "describe", "me-llama",
                                        "--zone=us-east5-a", "--project=proj",
                                        "--format=value(state.state)"]
  assert tpu.ssh_command(VM, "echo 'a b'") == [
      *GCLOUD_TPU, "tpu-vm", "ssh", "me-llama", "--zone=us-central2-b", "--worker=all",
      "--command=bash -c 'echo '\"'\"'a b'\"'\"''"]
  assert tpu.scp_to_all_command(VM, "src.tar.gz", "medllama-jax.tar.gz") == [
      *GCLOUD_TPU, "tpu-vm", "scp", "src.tar.gz", "me-llama:medllama-jax.tar.gz",
      "--zone=us-central2-b", "--worker=all"]
  target = tpu.TpuTarget(VM)
  assert target.on(3, "true") == [[*GCLOUD_TPU, "tpu-vm", "ssh", "me-llama",
                                    "--zone=us-central2-b", "--worker=3", "--command=bash -c true"]]
  assert target.collect_logs("r1", "out/logs") == [
      [["mkdir", "-p", "out/logs"]],
      [[*GCLOUD_TPU, "tpu-vm", "ssh", "me-llama", "--zone=us-central2-b", "--worker=all",
        "--command=bash -c 'cat \"$HOME\"/medllama-runs/r1/train.log'",
        "--output-directory=out/logs"]]]


@pytest.mark.parametrize("name, zone, message", [
    ("Me_Llama", "us-central2-b", "TPU name 'Me_Llama'"), ("1tpu", "us-central2-b", "starting with"),
    ("ok", "", "a zone is required")])
def test_bad_tpu_names(name, zone, message):
  with pytest.raises(ValueError, match=message):
    tpu.TpuVm(name, zone)


# ------------------------------------------------------------------------------ gin overrides

def test_gin_overrides_parse_and_check():
  o = remote.parse_gin_override('--gin.train.total_steps=1000')
  assert (o.name, o.value, o.flag, o.string_value()) == (
      "train.total_steps", "1000", "--gin.train.total_steps=1000", None)
  scoped = remote.parse_gin_override("--gin.eval/train.x='a=b'")
  assert (scoped.name, scoped.string_value()) == ("eval/train.x", "a=b")
  for bad in ("--gin.RUN_DIR", "--gin.=3", "--gin.1abc=3", "--gin.a b=3", "--gin.x=", "RUN_DIR=1"):
    with pytest.raises(ValueError, match="expected --gin.NAME=VALUE"):
      remote.parse_gin_override(bad)


def test_run_dir_must_be_a_quoted_shared_path():
  parse = lambda *flags: [remote.parse_gin_override(f) for f in flags]  # noqa: E731
  assert remote.check_run_dir(parse('--gin.RUN_DIR="gs://b/r"'), require_gcs=True) == "gs://b/r"
  assert remote.check_run_dir(parse("--gin.train.run_dir='/nfs/r'"), require_gcs=False) == "/nfs/r"
  with pytest.raises(ValueError, match="no run directory"):
    remote.check_run_dir(parse("--gin.train.total_steps=3"), require_gcs=True)
  with pytest.raises(ValueError, match="needs its inner quotes"):
    remote.check_run_dir(parse("--gin.RUN_DIR=gs://b/r"), require_gcs=True)
  with pytest.raises(ValueError, match="use a gs:// path"):
    remote.check_run_dir(parse('--gin.RUN_DIR="/tmp/r"'), require_gcs=True)


def test_other_bad_inputs():
  with pytest.raises(ValueError, match="run name 'a/b'"):
    remote.launch_script("a/b", [])
  with pytest.raises(ValueError, match="expected NAME=VALUE"):
    remote.parse_env(["NOVALUE"])
  with pytest.raises(ValueError, match="environment variable name 'A-B'"):
    remote.parse_env(["A-B=1"])
  with pytest.raises(ValueError, match="at least one --gin_file"):
    remote.trainer_args([], [])
  with pytest.raises(ValueError, match="gin file nope.gin: not found"):
    cli.check_gin_files(["nope.gin"])
  cli.check_gin_files(["gin/pretrain_me_llama_13b.gin", "pretrain_me_llama_70b.gin"])
  for bad in ((), ("-oProxyCommand=x",), ("a", "a")):
    with pytest.raises(ValueError):
      hosts.GpuHosts(bad)


def test_nasty_gin_values_survive_both_shell_levels():
  """ssh hands ``--command`` to the remote login shell; ``bash -c`` then parses the script."""
  script = remote.launch_script("r", remote.trainer_args(["gin/a.gin"], [
      remote.parse_gin_override(f) for f in NASTY]))
  command = tpu.ssh_command(VM, script)[-1].removeprefix("--command=")
  assert shlex.split(command) == ["bash", "-c", script]
  start = next(line for line in script.splitlines() if line.startswith("setsid nohup"))
  words = shlex.split(start)
  trainer = words.index("$HOME/medllama-venv/bin/medllama-train")
  assert words[trainer + 1:trainer + 5] == ["--gin_file=gin/a.gin", *NASTY]


# ------------------------------------------------------------------------------ GPU nodes

def test_gpu_hosts_get_their_process_env_and_commands():
  nodes = hosts.GpuHosts(("me@node0", "node1"), coordinator_port=1234)
  assert nodes.coordinator_address == "node0:1234"
  assert nodes.process_env(1) == {"JAX_COORDINATOR_ADDRESS": "node0:1234",
                                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  step = nodes.everywhere(lambda env: f"echo {env['JAX_PROCESS_ID']}")
  assert step == [["ssh", "me@node0", "bash -c 'echo 0'"], ["ssh", "node1", "bash -c 'echo 1'"]]
  assert nodes.upload("a.tgz", "b.tgz") == [["scp", "a.tgz", "me@node0:b.tgz"],
                                            ["scp", "a.tgz", "node1:b.tgz"]]
  assert nodes.collect_logs("r", "logs")[1] == [
      ["scp", "me@node0:medllama-runs/r/train.log", "logs/0.log"],
      ["scp", "node1:medllama-runs/r/train.log", "logs/1.log"]]
  assert hosts.GpuHosts(("a", "b"), coordinator_host="10.0.0.2").coordinator_address == "10.0.0.2:8476"
  with pytest.raises(ValueError, match="node 2: there are 2 hosts"):
    nodes.on(2, "true")


# ------------------------------------------------------------------------------ CLI and runner

LAUNCH = ["launch", "--tpu", "me-llama", "--zone", "us-central2-b", "--run_name", "r13",
          "--gin_file", "gin/pretrain_me_llama_13b.gin", *NASTY]


def _cli(argv, monkeypatch, capsys):
  started = []

  class FakePopen:
    def __init__(self, argv):
      started.append((list(argv), capsys.readouterr().out))

    def wait(self):
      return 0

  monkeypatch.setattr(runner.subprocess, "Popen", FakePopen)
  rc = cli.main(argv)
  return rc, started, capsys.readouterr()


def test_dry_run_prints_every_command_and_runs_nothing(monkeypatch, capsys):
  rc, started, captured = _cli([*LAUNCH, "--dry_run"], monkeypatch, capsys)
  assert rc == 0 and started == []
  assert captured.out.startswith("$ ") and captured.out.count("\n$ ") == 0  # one command
  argv = shlex.split(captured.out.removeprefix("$ "))
  assert argv[:8] == [*GCLOUD_TPU, "tpu-vm", "ssh", "me-llama", "--zone=us-central2-b",
                      "--worker=all"]
  script = shlex.split(argv[8].removeprefix("--command="))[2]
  assert "export TPU_STDERR_LOG_LEVEL=2" in script and "export PYTHONUNBUFFERED=1" in script
  assert all(shlex.quote(flag) in script for flag in NASTY)


def test_tpu_workers_let_jax_find_each_other(monkeypatch, capsys):
  """The launcher sets the variable partitioning.initialize_distributed reads on every worker."""
  from medllama_jax import partitioning
  argv = shlex.split(_cli([*LAUNCH, "--dry_run"], monkeypatch, capsys)[2].out.removeprefix("$ "))
  script = shlex.split(argv[8].removeprefix("--command="))[2]
  assert f"export {partitioning.AUTO_DISTRIBUTED_ENV}=auto" in script


def test_single_worker_slice_may_keep_its_run_dir_on_disk(monkeypatch, capsys):
  local = [*LAUNCH[:-3], "--gin.RUN_DIR=\"/home/me/runs/r\"", "--dry_run"]
  assert _cli(local, monkeypatch, capsys)[0] == 2
  rc, started, captured = _cli([*local, "--local_run_dir"], monkeypatch, capsys)
  assert (rc, started) == (0, []) and "/home/me/runs/r" in captured.out


def test_commands_are_printed_before_they_run(monkeypatch, capsys, tmp_path):
  archive = tmp_path / "src.tar.gz"
  with tarfile.open(archive, "w:gz") as t:
    t.add(__file__, arcname="setup.py")
  rc, started, captured = _cli(["install", "--tpu", "me-llama", "--zone", "us-central2-b",
                                "--archive", str(archive), "--jax_version", "0.10.2"],
                               monkeypatch, capsys)
  assert rc == 0 and len(started) == 2
  assert started[0][0] == tpu.scp_to_all_command(VM, str(archive), "medllama-jax.tar.gz")
  assert started[0][1] == runner.format_command(started[0][0]) + "\n"
  assert started[1][1] == runner.format_command(started[1][0]) + "\n"
  assert "'jax[tpu]==0.10.2'" in shlex.split(started[1][0][-1].removeprefix("--command="))[2]


def test_a_failing_command_ends_the_plan(monkeypatch):
  calls = []

  class FailingPopen:
    def __init__(self, argv):
      calls.append(argv)

    def wait(self):
      return 255

  monkeypatch.setattr(runner.subprocess, "Popen", FailingPopen)
  assert cli.main(["status", "--tpu", "me-llama", "--zone", "us-central2-b",
                   "--run_name", "r"]) == 255
  assert calls == [tpu.describe_command(VM)]


@pytest.mark.parametrize("argv, message", [
    (["create", "--tpu", "x", "--zone", "us-central2-b", "--accelerator_type", "v5p-64"],
     "does not offer TPU v5p"),
    (["create", "--hosts", "a,b", "--accelerator_type", "v4-8"], "works on TPU slices"),
    (["status", "--run_name", "r"], "name either a TPU slice"),
    (["status", "--tpu", "x", "--zone", "z", "--hosts", "a", "--run_name", "r"], "either"),
    (["stop", "--tpu", "x", "--zone", "z", "--run_name", "r", "--gin.A=1"], "go with launch"),
    ([*LAUNCH[:-3], "--gin.RUN_DIR=gs://b"], "inner quotes"),
    ([*LAUNCH, "--gin.bad name=1"], "expected --gin.NAME=VALUE"),
    (["install", "--tpu", "x", "--zone", "z", "--archive", "missing.tgz"], "no such file"),
    (["logs", "--tpu", "x", "--zone", "z", "--run_name", "r", "--worker", "-1"], "0 or more"),
])
def test_cli_rejects_bad_input_before_running_anything(argv, message, monkeypatch, capsys):
  rc, started, captured = _cli(argv, monkeypatch, capsys)
  assert (rc, started, captured.out) == (2, [], "")
  assert message in captured.err


def test_archive_must_hold_the_source_tree(tmp_path):
  nested = tmp_path / "nested.tar.gz"
  with tarfile.open(nested, "w:gz") as t:
    t.add(__file__, arcname="medllama-jax/setup.py")
  with pytest.raises(ValueError, match="no setup.py at the top"):
    cli.check_source_archive(str(nested))
  (tmp_path / "plain.txt").write_text("not an archive")
  with pytest.raises(ValueError, match="not a readable .tar.gz"):
    cli.check_source_archive(str(tmp_path / "plain.txt"))


# ------------------------------------------------------------------------------ remote scripts, run

FAKE_TRAINER = """\
import json, os, signal, sys, time
if "--gin.FAIL=1" in sys.argv:
  print("bad binding", flush=True)
  sys.exit(3)
with open(os.path.join(os.environ["HOME"], f"record-{os.getpid()}.json"), "w") as f:
  json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}, f)
print("fake trainer up", flush=True)
def term(signum, frame):
  print("SIGTERM: checkpoint saved", flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
  time.sleep(0.02)
"""


@pytest.fixture
def worker(tmp_path):
  """A home folder laid out as after ``install``, with a stand-in trainer; ``run(script)`` runs a
  command string the way sshd does (the login shell gets it); leftover trainers are killed."""
  home = tmp_path / "home"
  (home / "medllama-jax").mkdir(parents=True)
  (home / "medllama-venv" / "bin").mkdir(parents=True)
  trainer = home / "medllama-venv" / "bin" / "medllama-train"
  trainer.write_text(f"#!{sys.executable}\n{FAKE_TRAINER}")
  trainer.chmod(0o755)
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}

  def run(command):
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=60)

  run.home = home
  yield run
  for pid_file in home.glob("medllama-runs/*/train.pid"):
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def _remote(step):
  """The command string of a one-command ssh step (what the remote login shell receives)."""
  (argv,) = step
  return argv[-1].removeprefix("--command=")


def _record(home, run_name):
  """(pid, what the stand-in trainer of ``run_name`` saw), once it has started up."""
  pid = int((home / "medllama-runs" / run_name / "train.pid").read_text())
  record = home / f"record-{pid}.json"
  deadline = time.monotonic() + 30
  while not record.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
  return pid, json.loads(record.read_text())


def test_launch_status_stop_on_a_worker(worker):
  target = tpu.TpuTarget(VM)
  overrides = [remote.parse_gin_override(f) for f in NASTY]
  args = remote.trainer_args(["gin/pretrain_me_llama_13b.gin"], overrides)
  launch = lambda name: _remote(target.everywhere(  # noqa: E731
      lambda env: remote.launch_script(name, args, {**env, "A": "x y"}, startup_check_s=0)))
  first = worker(launch("r13"))
  assert first.returncode == 0, first.stderr
  decoy = worker(launch("other"))
  assert decoy.returncode == 0, decoy.stderr
  pid, record = _record(worker.home, "r13")
  assert record["argv"] == ["--gin_file=gin/pretrain_me_llama_13b.gin", *NASTY,
                            f"--log_dir={worker.home}/medllama-runs/r13"]
  assert record["cwd"] == str(worker.home / "medllama-jax") and record["env"]["A"] == "x y"
  assert f"started medllama-train (pid {pid})" in first.stdout

  again = worker(launch("r13"))
  assert again.returncode == 1 and f"already running (pid {pid})" in again.stderr
  status = worker(_remote(target.everywhere(lambda _: remote.status_script("r13"))))
  assert f"running (pid {pid}, for" in status.stdout and "fake trainer up" in status.stdout

  stop = worker(_remote(target.everywhere(lambda _: remote.stop_script("r13", wait_s=30))))
  assert stop.returncode == 0, stop.stderr
  assert f"sent SIGTERM to medllama-train (pid {pid})" in stop.stdout
  assert "SIGTERM: checkpoint saved" in stop.stdout
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  decoy_pid, _ = _record(worker.home, "other")
  os.kill(decoy_pid, 0)  # the other run's trainer is untouched
  assert "run r13 not running" in worker(remote.bash_command(remote.status_script("r13"))).stdout
  assert "run r13 is not running" in worker(remote.bash_command(
      remote.stop_script("r13", wait_s=30))).stdout

  relaunch = worker(launch("r13"))
  assert relaunch.returncode == 0, relaunch.stderr
  log = (worker.home / "medllama-runs" / "r13" / "train.log").read_text()
  assert log.count(" launch on ") == 2 and "SIGTERM: checkpoint saved" in log  # appended


def test_a_trainer_dying_at_start_fails_the_launch(worker):
  script = remote.launch_script("bad", ["--gin_file=a.gin", "--gin.FAIL=1"], startup_check_s=1)
  result = worker(remote.bash_command(script))
  assert result.returncode == 1
  assert "exited during start-up" in result.stderr and "bad binding" in result.stderr


def test_gpu_node_gets_its_jax_process_variables(worker):
  nodes = hosts.GpuHosts(("node0", "node1"))
  step = nodes.everywhere(lambda env: remote.launch_script(
      "g", ["--gin_file=a.gin"], {**cli.default_env(nodes), **env}, startup_check_s=0))
  result = worker(step[1][2])
  assert result.returncode == 0, result.stderr
  _, record = _record(worker.home, "g")
  assert {k: record["env"][k] for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                         "JAX_PROCESS_ID", "PYTHONUNBUFFERED")} == {
      "JAX_COORDINATOR_ADDRESS": "node0:8476", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
      "PYTHONUNBUFFERED": "1"}
  assert "TPU_STDERR_LOG_LEVEL" not in record["env"]


FAKE_UV = """#!/bin/sh
printf '%s\\n' "$*" >> "$HOME/uv-calls.txt"
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  printf '#!/bin/sh\\nexec {python} "$@"\\n' > "$last/bin/python"
  chmod +x "$last/bin/python"
fi
"""


@pytest.mark.parametrize("source", ["archive", "git"])
def test_install_replaces_the_code_and_installs_it(worker, tmp_path, source):
  home = worker.home
  (home / "medllama-jax" / "stale.py").write_text("old")
  (home / ".local" / "bin").mkdir(parents=True)
  uv = home / ".local" / "bin" / "uv"
  uv.write_text(FAKE_UV.replace("{python}", sys.executable))
  uv.chmod(0o755)
  tree = tmp_path / "tree"
  tree.mkdir()
  (tree / "setup.py").write_text("# new\n")
  if source == "archive":
    with tarfile.open(home / "medllama-jax.tar.gz", "w:gz") as t:
      t.add(tree / "setup.py", arcname="setup.py")
    code = remote.ArchiveSource("medllama-jax.tar.gz")
  else:
    git = ["git", "-C", str(tree), "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "c"]):
      subprocess.run([*git, *cmd], check=True, capture_output=True)
    code = remote.GitSource(str(tree), "main")
  result = worker(remote.bash_command(remote.install_script(code, "jax[tpu]==0.10.2")))
  assert result.returncode == 0, result.stderr
  assert (home / "medllama-jax" / "setup.py").read_text() == "# new\n"
  assert not (home / "medllama-jax" / "stale.py").exists()
  assert (home / "uv-calls.txt").read_text().splitlines() == [
      "venv --quiet --python 3.11 medllama-venv",
      "pip install --quiet --python medllama-venv/bin/python -e ./medllama-jax jax[tpu]==0.10.2"]
  assert "installed medllama-jax 0.1.0 jax " in result.stdout
