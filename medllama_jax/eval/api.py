"""Completions from an OpenAI-compatible HTTP endpoint, resumable, for baselines such as GPT-4.

The paper's tables put ChatGPT and GPT-4 next to Me-LLaMA. To reproduce such rows, the same task
prompts go to ``{base_url}/chat/completions`` (the prompt as the one user message, after an optional
system message) or ``{base_url}/completions`` (the prompt text), greedy (temperature 0), and the
answers go through the same scorers as the local model's. The standard library suffices (urllib,
json, a thread pool), so no client package is needed and any server speaking the protocol
(OpenAI, Azure-style gateways, vLLM, llama.cpp, TGI) works.

Remote endpoints fail and throttle; evaluation must neither lose paid-for answers nor hide missing
ones:

* every request is retried on HTTP 408/429/5xx, timeouts and connection errors, waiting as the
  server's ``Retry-After`` says or else exponentially longer with jitter (so that many clients
  throttled together do not come back together); other errors (a bad key, a too-long prompt) are
  not retried;
* at most ``concurrency`` requests are in flight;
* each answer is appended to a cache file (JSON lines, flushed) as soon as it arrives, keyed by the
  example's position and a hash of the exact request (URL, model, prompt, decoding settings); a
  rerun sends only the prompts without an answer, and a cache written with other settings or
  prompts is refused rather than mixed in;
* when some prompts still fail, :class:`IncompleteError` says how many are done, shows the last
  errors and how to resume: no result is computed from part of a task;
* Ctrl-C stops a run at once: no prompt is sent after it, a wait before a retry (a ``Retry-After``
  of minutes) ends, requests already sent are awaited for at most a second, every answer received
  (even then) is cached, a warning says how many answers are cached and where, and the
  KeyboardInterrupt goes on to the caller.

The API key is read from an environment variable whose name is configurable; it is sent only in the
``Authorization`` header and removed from every error text this module produces.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

ENDPOINTS = ("chat", "completions")
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# Statuses that say "try again later" (besides 5xx): request timeout, conflict (a lock held by
# another request), rate limit.
RETRY_STATUSES = frozenset({408, 409, 429})
# How much of an error response is quoted in messages.
_DETAIL_CHARS = 300
# How many failures an IncompleteError quotes.
_QUOTED_ERRORS = 3
# How often the main thread looks up from waiting for the senders: a bound on how late Ctrl-C is
# seen when the signal reaches one of their threads rather than the main one.
_POLL_S = 0.1
# How long a run stopped by Ctrl-C still waits for requests already sent: answers on their way are
# cached rather than paid for and lost, and the run still ends within about a second.
_STOP_GRACE_S = 1.0


class ApiError(Exception):
  """Base of this module's errors: the command-line tool reports them without a traceback."""


class RequestFailed(ApiError):
  """A request that did not give an answer (after its retries, when the error was retryable)."""


class Stopped(ApiError):
  """A request given up because its run is stopping (Ctrl-C): no failure of the endpoint."""


class _Retryable(Exception):
  """A failure worth another attempt; ``retry_after``: seconds the server asked us to wait."""

  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


class CacheMismatch(ApiError):
  """The cache file holds answers to other requests than the ones this run would send."""


class IncompleteError(ApiError):
  """Some prompts of a task have no answer; what did arrive is in the cache file."""


@dataclasses.dataclass(frozen=True)
class ApiSettings:
  """Where requests go and how hard to try.

  ``base_url``: up to and including the API version, e.g. ``https://api.openai.com/v1`` or
  ``http://127.0.0.1:8000/v1``; ``endpoint``: ``chat`` (``/chat/completions``, messages) or
  ``completions`` (``/completions``, prompt text); ``api_key_env``: the NAME of the environment
  variable holding the key; ``system_prompt``: a system message before the prompt (chat only);
  ``timeout_s``: per request, for connecting and for each read of the response;
  ``backoff_s``/``max_backoff_s``: the first retry waits about ``backoff_s``, each further one twice
  as long, never more than ``max_backoff_s`` (which also caps ``Retry-After``);
  ``max_consecutive_failures``: after this many prompts in a row failed all their attempts, the
  endpoint is taken to be down and the remaining prompts are not sent.
  """

  base_url: str
  model: str
  endpoint: str = "chat"
  api_key_env: str = DEFAULT_KEY_ENV
  system_prompt: str | None = None
  concurrency: int = 4
  max_retries: int = 5
  timeout_s: float = 120.0
  backoff_s: float = 1.0
  max_backoff_s: float = 60.0
  max_consecutive_failures: int = 10

  def __post_init__(self) -> None:
    if not self.base_url.startswith(("http://", "https://")):
      raise ValueError(f"api base_url must start with http:// or https://, not {self.base_url!r}")
    if not self.model:
      raise ValueError("api model name is empty")
    if self.endpoint not in ENDPOINTS:
      raise ValueError(f"api endpoint must be one of {ENDPOINTS}, not {self.endpoint!r}")
    if self.system_prompt is not None and self.endpoint != "chat":
      raise ValueError("a system message needs the chat endpoint")
    for name in ("concurrency", "max_consecutive_failures"):
      if getattr(self, name) < 1:
        raise ValueError(f"api {name} must be at least 1, not {getattr(self, name)}")
    for name in ("max_retries", "backoff_s", "max_backoff_s"):
      if getattr(self, name) < 0:
        raise ValueError(f"api {name} must not be negative, not {getattr(self, name)}")
    if self.timeout_s <= 0:
      raise ValueError(f"api timeout_s must be positive, not {self.timeout_s}")

  @property
  def url(self) -> str:
    return self.base_url.rstrip("/") + ("/chat/completions" if self.endpoint == "chat"
                                        else "/completions")


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  # Why generation ended ("stop", "length", ...), as the server says; None when it does not say.
  finish_reason: str | None


def request_body(settings: ApiSettings, prompt: str, max_tokens: int,
                 stop: Sequence[str] = ()) -> dict[str, Any]:
  """The JSON body asking for a greedy answer to ``prompt``: temperature 0, at most
  ``max_tokens``, ending at any of ``stop``."""
  body: dict[str, Any] = {"model": settings.model}
  if settings.endpoint == "chat":
    system = [] if settings.system_prompt is None else [
        {"role": "system", "content": settings.system_prompt}]
    body["messages"] = [*system, {"role": "user", "content": prompt}]
  else:
    body["prompt"] = prompt
  body.update(temperature=0, max_tokens=max_tokens)
  if stop:
    body["stop"] = list(stop)
  return body


def _retry_after(value: str | None) -> float | None:
  """Seconds to wait from a ``Retry-After`` header (delay in seconds, or an HTTP date)."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


class ApiClient:
  """Sends one request at a time per call of :meth:`complete` (thread-safe: no shared state but
  the settings and the key)."""

  def __init__(self, settings: ApiSettings):
    key = os.environ.get(settings.api_key_env)
    if not key:
      raise ApiError(f"environment variable {settings.api_key_env} (the API key) is not set or is "
                     f"empty; set it, or name another variable (--api_key_env). A local server "
                     f"that checks no key accepts any value.")
    self.settings = settings
    self._key = key

  def _redacted(self, text: str) -> str:
    """``text`` without the key (servers quote it back in errors); applied before any cut, so
    that no part of the key survives."""
    return text.replace(self._key, "<api key>")

  def _post(self, body: Mapping[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        self.settings.url, data=json.dumps(body).encode("utf-8"), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json",
                 "Authorization": f"Bearer {self._key}", "User-Agent": "medllama-eval"})
    timeout = self.settings.timeout_s
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      detail = self._redacted(e.read().decode("utf-8", "replace"))[:_DETAIL_CHARS]
      message = f"HTTP {e.code} {e.reason}: {detail}"
      if e.code in RETRY_STATUSES or e.code >= 500:
        raise _Retryable(message, _retry_after(e.headers.get("Retry-After"))) from None
      raise RequestFailed(message) from None
    except TimeoutError:
      raise _Retryable(f"no response within {timeout:g} s") from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, TimeoutError):
        raise _Retryable(f"no connection within {timeout:g} s") from None
      raise _Retryable(f"connection failed: {e.reason}") from None
    except (ConnectionError, http.client.HTTPException) as e:
      raise _Retryable(f"connection failed: {type(e).__name__}: {e}") from None
    try:
      return json.loads(payload)
    except ValueError:
      snippet = self._redacted(payload.decode("utf-8", "replace"))[:_DETAIL_CHARS]
      raise RequestFailed(f"response is not JSON: {snippet!r}") from None

  def _completion(self, response: Mapping[str, Any]) -> Completion:
    field = "message.content" if self.settings.endpoint == "chat" else "text"
    try:
      choice = response["choices"][0]
      text = choice["message"]["content"] if self.settings.endpoint == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
      choice, text = {}, None
    if not isinstance(text, str):
      snippet = self._redacted(json.dumps(response))[:_DETAIL_CHARS]
      raise RequestFailed(f"response has no text in choices[0].{field}: {snippet}")
    return Completion(text, choice.get("finish_reason"))

  def _backoff(self, attempt: int) -> float:
    """Exponential in ``attempt`` (0 for the first retry), scaled by a random factor in [0.5, 1]."""
    ceiling = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** attempt)
    return ceiling * random.uniform(0.5, 1.0)

  def complete(self, body: Mapping[str, Any], stop: threading.Event | None = None) -> Completion:
    """The answer to ``body``; raises :class:`RequestFailed` once the error is not retryable or
    ``1 + max_retries`` attempts failed, and :class:`Stopped` once ``stop`` is set: no attempt
    starts after that, and a wait before a retry ends at once rather than sitting out the
    server's ``Retry-After``."""
    stop = threading.Event() if stop is None else stop
    attempts = self.settings.max_retries + 1
    attempt = 1
    while True:
      if stop.is_set():
        raise Stopped(f"stopped before attempt {attempt} of {attempts}")
      try:
        return self._completion(self._post(body))
      except _Retryable as e:
        if attempt == attempts:
          raise RequestFailed(f"{e} (gave up after {attempts} attempts)") from None
        delay = self._backoff(attempt - 1) if e.retry_after is None else min(
            e.retry_after, self.settings.max_backoff_s)
        logging.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", self.settings.url, e,
                        delay, attempt + 1, attempts)
        stop.wait(delay)
        attempt += 1


def request_key(settings: ApiSettings, body: Mapping[str, Any]) -> str:
  """What an answer is an answer to: the URL and the exact request body, hashed."""
  text = json.dumps({"url": settings.url, "body": body}, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_header(settings: ApiSettings, body: Mapping[str, Any]) -> dict[str, Any]:
  """The settings a cache file was written with: the request without its prompt."""
  shown = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
  return {"url": settings.url, "system_prompt": settings.system_prompt, **shown}


class AnswerCache:
  """``path``: a first line holding the request settings, then one answer per line,
  ``{"index", "key", "text", "finish_reason"}``. Appends are flushed one by one, so a killed run
  loses at most the line being written (dropped when the file is next opened)."""

  def __init__(self, path: str, header: Mapping[str, Any]):
    self.path = path
    self.header = dict(header)
    self._lock = threading.Lock()

  def _read_lines(self) -> list[str]:
    with open(self.path, encoding="utf-8") as f:
      text = f.read()
    complete, _, partial = text.rpartition("\n")
    if partial:
      logging.warning("%s: dropping an unfinished last line (the run writing it was stopped)",
                      self.path)
      with open(self.path, "w", encoding="utf-8") as f:
        f.write(complete + "\n" if complete else "")
    return complete.split("\n") if complete else []

  def load(self, keys: Sequence[str]) -> dict[int, Completion]:
    """The cached answers, by example index, to the requests whose keys are ``keys``. Raises
    :class:`CacheMismatch` if the file was written for other settings or other prompts."""
    if not os.path.exists(self.path):
      return {}
    lines = self._read_lines()
    if not lines:
      return {}
    records = []
    for number, line in enumerate(lines, 1):
      try:
        records.append(json.loads(line))
      except ValueError:
        raise ApiError(f"{self.path}, line {number}: not JSON; delete the file to start over"
                       ) from None
    header, answers = records[0].get("settings"), records[1:]
    if header != self.header:
      old = header if isinstance(header, dict) else {}
      changed = sorted(k for k in {*old, *self.header} if old.get(k) != self.header.get(k))
      raise CacheMismatch(
          f"{self.path} holds answers to requests with other settings (" +
          ", ".join(f"{k}: cached {old.get(k)!r}, now {self.header.get(k)!r}" for k in changed) +
          "); they are not reused. Use another output folder, or delete the file to start over.")
    found: dict[int, Completion] = {}
    stale = 0
    for record in answers:
      index = record.get("index")
      if isinstance(index, int) and 0 <= index < len(keys) and record.get("key") == keys[index]:
        found.setdefault(index, Completion(record["text"], record.get("finish_reason")))
      else:
        stale += 1
    if stale:
      raise CacheMismatch(
          f"{self.path}: {stale} cached answers are to other prompts than this run's (the data, "
          f"the prompt variant, the few-shot seed or the chat template changed); they are not "
          f"reused. Use another output folder, or delete the file to start over.")
    return found

  def append(self, index: int, key: str, completion: Completion) -> None:
    with self._lock:
      new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
      with open(self.path, "a", encoding="utf-8") as f:
        if new:
          f.write(json.dumps({"settings": self.header}) + "\n")
        f.write(json.dumps({"index": index, "key": key, "text": completion.text,
                            "finish_reason": completion.finish_reason}) + "\n")
        f.flush()


class _Batch:
  """The missing answers of one task, asked for by up to ``concurrency`` threads of their own.

  Each thread caches its answers as they arrive, so that an answer received while the run stops is
  kept too. The threads are daemons: a request still unanswered when the run ends is given up
  rather than keeping the process alive until its timeout."""

  def __init__(self, client: ApiClient, bodies: Sequence[Mapping[str, Any]], keys: Sequence[str],
               cache: AnswerCache, answers: dict[int, Completion], missing: Sequence[int],
               label: str):
    self.client = client
    self.bodies = bodies
    self.keys = keys
    self.cache = cache
    self.answers = answers
    self.label = label
    self.failures: dict[int, str] = {}
    # Set by Ctrl-C or an unexpected error: nothing more is sent and waits before retries end.
    self.stop = threading.Event()
    self._error: Exception | None = None
    self._threads = min(client.settings.concurrency, len(missing))
    self._pending = iter(missing)
    # Set by the last thread to end. Waited on rather than joining the threads: a Ctrl-C that
    # interrupts Thread.join can leave a running thread marked as ended (Python 3.11).
    self._running = self._threads
    self._ended = threading.Event()
    # Set once max_consecutive_failures prompts in a row failed: no new prompt is taken, but the
    # ones being retried go on.
    self._endpoint_down = False
    self._consecutive = 0
    self._lock = threading.Lock()

  def done(self) -> int:
    with self._lock:
      return len(self.answers)

  def run(self) -> None:
    """Sends every missing prompt. On Ctrl-C, stops the threads, waits at most
    ``_STOP_GRACE_S`` for requests already sent, and re-raises."""
    if not self._threads:
      return
    try:
      for n in range(self._threads):
        threading.Thread(target=self._work, name=f"{self.label}-api-{n}", daemon=True).start()
      while not self._ended.wait(_POLL_S):
        pass
    except KeyboardInterrupt:
      self.stop.set()
      self._ended.wait(_STOP_GRACE_S)
      raise
    if self._error is not None:
      raise self._error

  def _take(self) -> int | None:
    """The next prompt to send; None when none is left or none may be sent."""
    with self._lock:
      if self.stop.is_set() or self._endpoint_down:
        return None
      return next(self._pending, None)

  def _work(self) -> None:
    """One thread's loop. An unexpected error (the cache cannot be written) stops every thread
    and is raised by :meth:`run` in the main thread."""
    try:
      while (index := self._take()) is not None:
        try:
          completion = self.client.complete(self.bodies[index], self.stop)
        except RequestFailed as e:
          self._failed(index, str(e))
        else:
          self._answered(index, completion)
    except Stopped:
      pass
    except Exception as e:  # Raised again in the main thread, by run.
      with self._lock:
        self._error = self._error or e
      self.stop.set()
    finally:
      with self._lock:
        self._running -= 1
        if not self._running:
          self._ended.set()

  def _answered(self, index: int, completion: Completion) -> None:
    with self._lock:
      self.cache.append(index, self.keys[index], completion)
      self.answers[index] = completion
      self._consecutive = 0
      done, total = len(self.answers), len(self.bodies)
    if done % max(1, total // 10) == 0 or done == total:
      logging.info("%s: %d/%d answers", self.label, done, total)

  def _failed(self, index: int, message: str) -> None:
    with self._lock:
      self.failures[index] = message
      self._consecutive += 1
      if self._endpoint_down or self._consecutive < self.client.settings.max_consecutive_failures:
        return
      self._endpoint_down = True
    logging.error("%s: %d prompts in a row failed; not sending the others", self.label,
                  self.client.settings.max_consecutive_failures)


def _resume_hint(cache_path: str, done: int, total: int) -> str:
  """How to go on; names the cache file only when it holds answers (it is written with the
  first one)."""
  if not done:
    return (f"No answer was received, so none is cached; run the same command again to send the "
            f"{total} prompts.")
  return (f"The {done} answers so far are in {cache_path}; run the same command again to send "
          f"only the {total - done} missing prompts.")


def complete_all(client: ApiClient, bodies: Sequence[Mapping[str, Any]], cache_path: str,
                 label: str) -> list[Completion]:
  """The answers to ``bodies`` in order: those in ``cache_path`` reused, the others requested (at
  most ``concurrency`` at a time) and cached as they arrive. Raises :class:`IncompleteError` when
  any is still missing; on Ctrl-C, says what is cached and re-raises the KeyboardInterrupt within
  about a second."""
  if not bodies:
    return []
  settings = client.settings
  keys = [request_key(settings, body) for body in bodies]
  os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
  cache = AnswerCache(cache_path, cache_header(settings, bodies[0]))
  answers = cache.load(keys)
  missing = [i for i in range(len(bodies)) if i not in answers]
  logging.info("%s: %d of %d answers cached in %s; sending %d prompts to %s (model %s)", label,
               len(answers), len(bodies), cache_path, len(missing), settings.url, settings.model)
  batch = _Batch(client, bodies, keys, cache, answers, missing, label)
  try:
    batch.run()
  except KeyboardInterrupt:
    done = batch.done()
    logging.warning("%s: stopped by Ctrl-C with %d of %d answers. %s", label, done, len(bodies),
                    _resume_hint(cache_path, done, len(bodies)))
    raise
  if len(answers) < len(bodies):
    failures = batch.failures
    unsent = len(bodies) - len(answers) - len(failures)
    quoted = "; ".join(f"[example {i}] {failures[i]}" for i in list(failures)[-_QUOTED_ERRORS:])
    raise IncompleteError(
        f"{label}: partial: {len(answers)} of {len(bodies)} done; {len(failures)} failed" +
        (f", {unsent} not sent after {settings.max_consecutive_failures} failures in a row"
         if unsent else "") +
        f". Last errors: {quoted}. {_resume_hint(cache_path, len(answers), len(bodies))} No "
        f"metrics were computed for {label}.")
  return [answers[i] for i in range(len(bodies))]
