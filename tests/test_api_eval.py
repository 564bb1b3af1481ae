"""Evaluation through an OpenAI-compatible endpoint, against a server on loopback started here.

The server (``http.server`` in a thread on 127.0.0.1, port 0) answers ``/v1/chat/completions`` and
``/v1/completions`` as each test tells it to, and records every request and how many were in
flight at once. Checked: an oracle endpoint scores exactly as the local path does when the model
generates the targets; the exact request (body, URL, key header); retries on 429 honouring
Retry-After and on timeouts; a failing endpoint leaves a partial cache, a clear error and no
metrics, and a rerun sends only the missing prompts; the concurrency bound; the key never written;
Ctrl-C (a SIGINT to the main thread) against a throttling server stops the run within a second,
sends nothing more, keeps every answer the server gave (even one arriving while stopping), and a
rerun sends only the rest; no message names a cache file that was never written; a cache that
cannot be written stops the run with its error.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import seqio

import seqio_tasks.mibe
from medllama_jax import loading, tokenizer
from medllama_jax.config import get_config
from medllama_jax.demo import demo_data_path, demo_text_path
from medllama_jax.cli import eval as cli
from medllama_jax.eval import api, evaluator

DATA = demo_data_path("mibe")
DATASETS = ("pubmedqa", "medqa")
KEY_ENV = "MEDLLAMA_TEST_API_KEY"
KEY = "sk-test-0123456789abcdef"
# The release's evaluation wrapper, written out here as the reference for the chat template path.
RELEASE_WRAPPER = "Human: \n{}\n\nAssistant: \n"

# (path, body, headers) -> (status, extra headers, response JSON or raw bytes)
Behaviour = Callable[[str, dict[str, Any], dict[str, str]], tuple[int, dict[str, str], Any]]


@dataclasses.dataclass
class Endpoint:
  """The loopback server's state: what it does and what it saw."""
  url: str
  behaviour: Behaviour
  requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  in_flight: int = 0
  max_in_flight: int = 0
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def prompt_of(body: dict[str, Any]) -> str:
  return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def reply(path: str, text: str) -> dict[str, Any]:
  """A response in the protocol's shape for ``text``."""
  choice = ({"index": 0, "message": {"role": "assistant", "content": text}}
            if path.endswith("/chat/completions") else {"index": 0, "text": text})
  return {"id": "cmpl-test", "object": "test", "choices": [{**choice, "finish_reason": "stop"}]}


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
  state = Endpoint("", lambda path, body, headers: (500, {}, {"error": "no behaviour set"}))

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      with state.lock:
        state.requests.append({"path": self.path, "body": body, "headers": dict(self.headers),
                               "time": time.monotonic()})
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
      try:
        status, headers, payload = state.behaviour(self.path, body, dict(self.headers))
      finally:
        with state.lock:
          state.in_flight -= 1
      data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
      try:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
          self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
      except OSError:  # the client gave up waiting (timeout tests)
        pass

    def log_message(self, *args: Any) -> None:
      del args

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.daemon_threads = True
  server.block_on_close = False
  state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                            daemon=True)
  thread.start()
  yield state
  server.shutdown()
  server.server_close()
  thread.join()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(scope="module")
def vocabulary_path(tmp_path_factory: pytest.TempPathFactory) -> str:
  return tokenizer.train_sentencepiece(demo_text_path(), tmp_path_factory.mktemp("tok") / "tok",
                                       512)


@pytest.fixture(scope="module")
def task_rows(vocabulary_path: str) -> dict[str, list[dict[str, Any]]]:
  """Task name → its test rows, the tasks registered over the shipped MIBE samples."""
  names = seqio_tasks.mibe.register_mibe_tasks(DATA, vocabulary_path, datasets=DATASETS)
  return {name: list(seqio.get_mixture_or_task(name).get_dataset(None, split="test",
                                                                  shuffle=False)
                     .as_numpy_iterator()) for name in names}


def targets_by_prompt(task_rows: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
  return {row["inputs_pretokenized"].decode(): row["targets_pretokenized"].decode()
          for rows in task_rows.values() for row in rows}


def oracle(answers: dict[str, str]) -> Behaviour:
  return lambda path, body, headers: (200, {}, reply(path, answers[prompt_of(body)]))


def settings(server: Endpoint, **overrides: Any) -> api.ApiSettings:
  return api.ApiSettings(**{"base_url": server.url, "model": "test-model",
                            "api_key_env": KEY_ENV, "backoff_s": 0.001, **overrides})


def cli_args(endpoint: Endpoint, vocabulary_path: str, out: Path, *extra: str) -> list[str]:
  return ["--api_base_url", endpoint.url, "--api_model", "test-model", "--api_key_env", KEY_ENV,
          "--tokenizer", vocabulary_path, "--data_dir", DATA, "--out", str(out),
          "--tasks", ",".join(DATASETS), *extra]


def local_oracle_metrics(task_rows: dict[str, list[dict[str, Any]]],
                         monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
  """Metrics of the local path (prompt ids, decode.generate, detokenization) with generation
  replaced by an oracle that returns each prompt's target ids."""
  target_ids = {tuple(row["inputs"].tolist()): row["targets"].tolist()
                for rows in task_rows.values() for row in rows}

  def generate(model, params, prompts, sampling, **kwargs):
    del model, params, sampling, kwargs
    return [target_ids[tuple(p)] for p in prompts]

  monkeypatch.setattr(evaluator.decode, "generate", generate)
  config = dataclasses.replace(get_config("tiny"), max_position_embeddings=4096)
  loaded = loading.LoadedModel(config, None, None, None, None, None)
  local_settings = evaluator.EvalSettings(max_new_tokens=8, batch_size=2, score_options=False)
  return {name: evaluator.run_task(loaded, name, local_settings).metrics for name in task_rows}


def test_oracle_endpoint_scores_exactly_as_the_local_path(
    endpoint: Endpoint, vocabulary_path: str, task_rows: dict[str, list[dict[str, Any]]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  endpoint.behaviour = oracle(targets_by_prompt(task_rows))
  out = tmp_path / "eval"
  assert cli.main(cli_args(endpoint, vocabulary_path, out)) == 0
  results = json.loads((out / "results.json").read_text())
  expected = local_oracle_metrics(task_rows, monkeypatch)
  assert results["model"] == "test-model"
  for name, metrics in expected.items():
    task = results["tasks"][name]
    assert task["metrics"] == metrics
    assert metrics["release/acc"] == 1.0 and metrics["fixed/acc"] == 1.0
    assert task["api"] == {"base_url": endpoint.url, "endpoint": "chat", "model": "test-model",
                           "system_prompt": None, "temperature": 0}
    assert not any(key.startswith("loglikelihood/") for key in task["metrics"])
    assert "log-probabilities" in task["not_computed"]["loglikelihood/*"]
  assert len(endpoint.requests) == sum(len(rows) for rows in task_rows.values())
  assert not any(KEY.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())

  # A rerun finds every answer in the cache and sends nothing.
  endpoint.requests.clear()
  assert cli.main(cli_args(endpoint, vocabulary_path, out)) == 0
  assert endpoint.requests == []


@pytest.mark.parametrize("endpoint_kind", ["chat", "completions"])
def test_request_is_the_task_prompt_greedy_with_the_key(
    endpoint: Endpoint, vocabulary_path: str, task_rows: dict[str, list[dict[str, Any]]],
    tmp_path: Path, endpoint_kind: str):
  endpoint.behaviour = lambda path, body, headers: (200, {}, reply(path, "A"))
  name = "mibe_medqa_0shot"
  extra = (["--api_system", "Answer briefly."] if endpoint_kind == "chat"
           else ["--chat_template", "medllama"])
  out = tmp_path / "eval"
  assert cli.main(cli_args(endpoint, vocabulary_path, out, "--api_endpoint", endpoint_kind,
                           "--max_new_tokens", "7", "--stop", "\n\n", *extra)) == 0
  assert len(endpoint.requests) == 6
  medqa = [r for r in endpoint.requests if "US Medical Licensing" in prompt_of(r["body"])]
  rows = task_rows[name]
  vocabulary = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
  sent = sorted(medqa, key=lambda r: prompt_of(r["body"]))
  for request, row in zip(sent, sorted(rows, key=lambda r: r["inputs_pretokenized"])):
    prompt = row["inputs_pretokenized"].decode()
    # The text is the prompt whose ids the local model reads (BOS first).
    assert vocabulary.decode(row["inputs"][1:].tolist()) == prompt
    if endpoint_kind == "chat":
      assert request["path"] == "/v1/chat/completions"
      content = [{"role": "system", "content": "Answer briefly."},
                 {"role": "user", "content": prompt}]
      assert request["body"] == {"model": "test-model", "messages": content, "temperature": 0,
                                 "max_tokens": 7, "stop": ["\n\n"]}
    else:
      assert request["path"] == "/v1/completions"
      assert request["body"] == {"model": "test-model", "prompt": RELEASE_WRAPPER.format(
          prompt.strip()), "temperature": 0, "max_tokens": 7, "stop": ["\n\n"]}
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["headers"]["Content-Type"] == "application/json"
  results = json.loads((out / "results.json").read_text())
  assert results["tasks"][name]["api"]["endpoint"] == endpoint_kind
  assert KEY not in (out / "results.json").read_text()


def test_429_with_retry_after_is_retried_after_the_wait(endpoint: Endpoint):
  def throttle_once(path: str, body: dict[str, Any], headers: dict[str, str]):
    if len(endpoint.requests) == 1:
      return 429, {"Retry-After": "1"}, {"error": {"message": "rate limited"}}
    return 200, {}, reply(path, "fine")

  endpoint.behaviour = throttle_once
  client = api.ApiClient(settings(endpoint, max_retries=2))
  completion = client.complete(api.request_body(client.settings, "hello", 4))
  assert completion == api.Completion("fine", "stop")
  first, second = endpoint.requests
  # backoff_s is 1 ms: only Retry-After explains the wait.
  assert second["time"] - first["time"] >= 0.95
  assert first["body"] == second["body"]


def test_server_errors_are_retried_with_exponentially_longer_waits(endpoint: Endpoint):
  def fail_three_times(path: str, body: dict[str, Any], headers: dict[str, str]):
    if len(endpoint.requests) <= 3:
      return 500, {}, {"error": {"message": "internal"}}
    return 200, {}, reply(path, "done")

  endpoint.behaviour = fail_three_times
  client = api.ApiClient(settings(endpoint, backoff_s=0.04, max_retries=3))
  assert client.complete(api.request_body(client.settings, "q", 4)).text == "done"
  times = [r["time"] for r in endpoint.requests]
  gaps = [b - a for a, b in zip(times[:-1], times[1:])]
  # Retry k waits backoff_s * 2**k scaled by a random factor in [0.5, 1]: at least half of that.
  assert len(gaps) == 3 and all(gap >= 0.5 * 0.04 * 2 ** k for k, gap in enumerate(gaps))


def test_a_slow_response_times_out_is_retried_then_reported(endpoint: Endpoint, tmp_path: Path):
  def slow_for_one_prompt(path: str, body: dict[str, Any], headers: dict[str, str]):
    if prompt_of(body) == "slow":
      time.sleep(0.6)
    return 200, {}, reply(path, prompt_of(body).upper())

  endpoint.behaviour = slow_for_one_prompt
  client = api.ApiClient(settings(endpoint, timeout_s=0.15, max_retries=2))
  bodies = [api.request_body(client.settings, prompt, 4) for prompt in ("fast", "slow")]
  cache = tmp_path / "cache" / "task.jsonl"
  with pytest.raises(api.IncompleteError) as error:
    api.complete_all(client, bodies, str(cache), "task")
  message = str(error.value)
  assert "partial: 1 of 2 done" in message and "no response within 0.15 s" in message
  assert "gave up after 3 attempts" in message and "send only the 1 missing" in message
  assert [prompt_of(r["body"]) for r in endpoint.requests].count("slow") == 3
  header, answer = (json.loads(line) for line in cache.read_text().splitlines())
  assert header["settings"]["model"] == "test-model" and answer["text"] == "FAST"


def test_failing_endpoint_gives_partial_cache_and_no_metrics_then_resumes(
    endpoint: Endpoint, vocabulary_path: str, task_rows: dict[str, list[dict[str, Any]]],
    tmp_path: Path, capsys: pytest.CaptureFixture[str]):
  answers = targets_by_prompt(task_rows)
  pubmedqa = [row["inputs_pretokenized"].decode() for row in task_rows["mibe_pubmedqa_0shot"]]
  failing = {pubmedqa[0], pubmedqa[2]}

  def fail_some(path: str, body: dict[str, Any], headers: dict[str, str]):
    if prompt_of(body) in failing:
      return 503, {}, {"error": {"message": "overloaded"}}
    return 200, {}, reply(path, answers[prompt_of(body)])

  endpoint.behaviour = fail_some
  out = tmp_path / "eval"
  args = cli_args(endpoint, vocabulary_path, out, "--api_max_retries", "0")
  assert cli.main(args) == 1
  message = capsys.readouterr().err
  assert "mibe_pubmedqa_0shot: partial: 1 of 3 done; 2 failed" in message
  assert "HTTP 503" in message and "overloaded" in message
  assert "run the same command again to send only the 2 missing prompts" in message
  assert not (out / "results.json").exists()
  cache = out / "api_cache" / "mibe_pubmedqa_0shot.jsonl"
  lines = [json.loads(line) for line in cache.read_text().splitlines()]
  assert [line["index"] for line in lines[1:]] == [1]

  # Other settings: the cache is refused, nothing is sent.
  endpoint.requests.clear()
  other = [a if a != "test-model" else "other-model" for a in args]
  assert cli.main(other) == 1
  assert "cached 'test-model', now 'other-model'" in capsys.readouterr().err
  assert endpoint.requests == []

  # Healthy again: only the two missing prompts go out, and the run completes.
  endpoint.behaviour = oracle(answers)
  assert cli.main(args) == 0
  sent = [prompt_of(r["body"]) for r in endpoint.requests]
  assert set(sent[:2]) == failing
  assert len(sent) == 2 + len(task_rows["mibe_medqa_0shot"])
  results = json.loads((out / "results.json").read_text())
  assert results["tasks"]["mibe_pubmedqa_0shot"]["metrics"]["release/acc"] == 1.0


def test_concurrency_is_bounded(endpoint: Endpoint, tmp_path: Path):
  def slow_echo(path: str, body: dict[str, Any], headers: dict[str, str]):
    time.sleep(0.05)
    return 200, {}, reply(path, prompt_of(body) + "!")

  endpoint.behaviour = slow_echo
  client = api.ApiClient(settings(endpoint, concurrency=3, endpoint="completions"))
  prompts = [f"prompt {i}" for i in range(12)]
  bodies = [api.request_body(client.settings, p, 4) for p in prompts]
  completions = api.complete_all(client, bodies, str(tmp_path / "c.jsonl"), "task")
  assert [c.text for c in completions] == [p + "!" for p in prompts]
  assert endpoint.max_in_flight == 3
  assert len(endpoint.requests) == 12


def test_a_dead_endpoint_stops_being_asked(endpoint: Endpoint, tmp_path: Path):
  endpoint.behaviour = lambda path, body, headers: (502, {}, b"<html>bad gateway</html>")
  client = api.ApiClient(settings(endpoint, concurrency=1, max_retries=0,
                                  max_consecutive_failures=3))
  bodies = [api.request_body(client.settings, f"p{i}", 4) for i in range(10)]
  with pytest.raises(api.IncompleteError) as error:
    api.complete_all(client, bodies, str(tmp_path / "c.jsonl"), "task")
  # The one thread counts each failure before it takes the next prompt.
  assert len(endpoint.requests) == 3
  assert "partial: 0 of 10 done" in str(error.value) and "not sent after 3 failures" in str(
      error.value)


def test_errors_that_retrying_cannot_fix_are_not_retried_and_never_show_the_key(
    endpoint: Endpoint):
  endpoint.behaviour = lambda path, body, headers: (
      401, {}, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
  client = api.ApiClient(settings(endpoint, max_retries=3))
  with pytest.raises(api.RequestFailed) as error:
    client.complete(api.request_body(client.settings, "hi", 4))
  assert len(endpoint.requests) == 1
  assert "HTTP 401" in str(error.value) and "<api key>" in str(error.value)
  assert KEY not in str(error.value)


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch):
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(api.ApiError, match=f"environment variable {KEY_ENV}"):
    api.ApiClient(api.ApiSettings("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV))


def test_cache_drops_a_line_cut_by_a_kill(tmp_path: Path, endpoint: Endpoint):
  client = api.ApiClient(settings(endpoint))
  body = api.request_body(client.settings, "q", 4)
  key = api.request_key(client.settings, body)
  path = tmp_path / "c.jsonl"
  cache = api.AnswerCache(str(path), api.cache_header(client.settings, body))
  cache.append(0, key, api.Completion("kept", "stop"))
  with open(path, "a") as f:
    f.write('{"index": 1, "key": "')
  assert cache.load([key, "other"]) == {0: api.Completion("kept", "stop")}
  assert path.read_text().endswith('"finish_reason": "stop"}\n')


def echo_upper(path: str, body: dict[str, Any], headers: dict[str, str]):
  return 200, {}, reply(path, prompt_of(body).upper())


def throttled(path: str, body: dict[str, Any], headers: dict[str, str]):
  return 429, {"Retry-After": "30"}, {"error": {"message": "rate limited"}}


@dataclasses.dataclass
class CtrlC:
  """A SIGINT sent to the main thread, as a terminal's Ctrl-C, once the server has received every
  prompt of ``awaited``; ``requests``: how many requests the server had received by then."""
  endpoint: Endpoint
  awaited: set[str]
  sent: threading.Event = dataclasses.field(default_factory=threading.Event)
  time: float = 0.0
  requests: int = 0

  def start(self) -> None:
    threading.Thread(target=self._send, daemon=True).start()

  def _send(self) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      with self.endpoint.lock:
        if self.awaited <= {prompt_of(r["body"]) for r in self.endpoint.requests}:
          self.requests = len(self.endpoint.requests)
          break
      time.sleep(0.01)
    else:
      return
    self.time = time.monotonic()
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    self.sent.set()


def cached_texts(path: Path, prompts: list[str]) -> dict[str, str]:
  return {prompts[record["index"]]: record["text"]
          for record in map(json.loads, path.read_text().splitlines()[1:])}


@pytest.fixture
def terminal_ctrl_c():
  """Python's own SIGINT handler (KeyboardInterrupt), as in a terminal, whatever an earlier test in
  this worker process installed."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("terminal_ctrl_c")
def test_ctrl_c_stops_at_once_keeps_every_answer_and_a_rerun_sends_only_the_rest(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture):
  # Three workers: a0-a3 are answered, then each holds one of throttled0, throttled1 (waiting
  # 30 s to retry) and slow (answered only after the Ctrl-C); a4-a6 are not sent yet.
  prompts = ["a0", "a1", "a2", "a3", "throttled0", "throttled1", "slow", "a4", "a5", "a6"]
  ctrl_c = CtrlC(endpoint, {"throttled0", "throttled1", "slow"})
  answered = []

  def throttle_some(path: str, body: dict[str, Any], headers: dict[str, str]):
    if prompt_of(body).startswith("throttled"):
      return throttled(path, body, headers)
    if prompt_of(body) == "slow":
      ctrl_c.sent.wait(10)
      time.sleep(0.2)
    with endpoint.lock:
      answered.append(prompt_of(body))
    return echo_upper(path, body, headers)

  endpoint.behaviour = throttle_some
  client = api.ApiClient(settings(endpoint, concurrency=3, endpoint="completions"))
  bodies = [api.request_body(client.settings, p, 4) for p in prompts]
  cache = tmp_path / "task.jsonl"
  ctrl_c.start()
  with pytest.raises(KeyboardInterrupt):
    api.complete_all(client, bodies, str(cache), "task")
  assert ctrl_c.sent.is_set() and time.monotonic() - ctrl_c.time < 2
  time.sleep(0.3)  # time enough for a retry or a next prompt to reach the server
  assert len(endpoint.requests) == ctrl_c.requests == 7
  assert sorted(answered) == ["a0", "a1", "a2", "a3", "slow"]
  assert cached_texts(cache, prompts) == {p: p.upper() for p in answered}
  assert "stopped by Ctrl-C with 5 of 10 answers" in caplog.text
  assert f"are in {cache}; run the same command again to send only the 5 missing" in caplog.text

  endpoint.requests.clear()
  endpoint.behaviour = echo_upper
  completions = api.complete_all(client, bodies, str(cache), "task")
  assert [c.text for c in completions] == [p.upper() for p in prompts]
  assert sorted(prompt_of(r["body"]) for r in endpoint.requests) == [
      "a4", "a5", "a6", "throttled0", "throttled1"]


@pytest.mark.usefixtures("terminal_ctrl_c")
def test_ctrl_c_before_any_answer_names_no_cache_file(endpoint: Endpoint, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture):
  endpoint.behaviour = throttled
  client = api.ApiClient(settings(endpoint, concurrency=2))
  bodies = [api.request_body(client.settings, p, 4) for p in ("p0", "p1", "p2")]
  cache = tmp_path / "task.jsonl"
  ctrl_c = CtrlC(endpoint, {"p0", "p1"})
  ctrl_c.start()
  with pytest.raises(KeyboardInterrupt):
    api.complete_all(client, bodies, str(cache), "task")
  assert ctrl_c.sent.is_set() and time.monotonic() - ctrl_c.time < 2
  stopped = [r.getMessage() for r in caplog.records if "stopped by Ctrl-C" in r.getMessage()]
  assert len(stopped) == 1 and "with 0 of 3 answers. No answer was received" in stopped[0]
  assert str(cache) not in stopped[0] and not cache.exists()
  assert len(endpoint.requests) == ctrl_c.requests == 2


def test_an_error_without_any_answer_names_no_cache_file(endpoint: Endpoint, tmp_path: Path):
  endpoint.behaviour = lambda path, body, headers: (
      400, {}, {"error": {"message": "prompt too long"}})
  client = api.ApiClient(settings(endpoint))
  bodies = [api.request_body(client.settings, p, 4) for p in ("p0", "p1")]
  cache = tmp_path / "task.jsonl"
  with pytest.raises(api.IncompleteError) as error:
    api.complete_all(client, bodies, str(cache), "task")
  assert not cache.exists() and str(cache) not in str(error.value)
  assert "partial: 0 of 2 done; 2 failed" in str(error.value)
  assert "No answer was received" in str(error.value)


def test_a_stop_ends_the_wait_before_a_retry_at_once(endpoint: Endpoint):
  endpoint.behaviour = throttled
  client = api.ApiClient(settings(endpoint, max_retries=3))
  stop = threading.Event()
  threading.Timer(0.2, stop.set).start()
  start = time.monotonic()
  with pytest.raises(api.Stopped):
    client.complete(api.request_body(client.settings, "q", 4), stop)
  assert time.monotonic() - start < 1.5
  assert len(endpoint.requests) == 1


def test_a_cache_that_cannot_be_written_stops_the_run_with_its_error(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  def disk_full(*args: Any) -> None:
    raise OSError("No space left on device")

  monkeypatch.setattr(api.AnswerCache, "append", disk_full)
  endpoint.behaviour = echo_upper
  client = api.ApiClient(settings(endpoint, concurrency=1))
  bodies = [api.request_body(client.settings, p, 4) for p in ("p0", "p1", "p2")]
  with pytest.raises(OSError, match="No space left"):
    api.complete_all(client, bodies, str(tmp_path / "task.jsonl"), "task")
  assert len(endpoint.requests) == 1
