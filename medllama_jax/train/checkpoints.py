"""Run checkpoints: the whole train state and the data position, saved together by one Orbax manager.

A step's checkpoint holds three items:

* ``state``: the ``TrainState`` (step, parameters, optimizer state), written by every host from its
  own shards (the primary host writes the metadata) and restored straight onto the target shardings
  (``partitioning.placed``), whatever mesh or number of hosts wrote it;
* ``data``: the input-pipeline position of every data shard (``DataIterator.save``: each process
  writes the shards it reads), so a resumed run reads exactly the examples an uninterrupted run would
  have read next, with as many processes as divide the number of data shards;
* ``meta``: a small JSON record (step, tokens seen, the data description) for humans and checks,
  with the checksums of every tensor of ``state`` (``checkpointing.tensor_checksums``, reduced on
  the devices) under ``checksums``, which ``restore`` checks the restored state against.

Orbax writes every step into a temporary folder and renames it into place only when all items are
complete, so a run killed in the middle of a save (``kill -9``, a preempted VM) leaves a temporary
folder that is never listed, and ``latest_step`` is always a checkpoint that restores (its
checksums, written in the same step, are never those of a half-written state). Saves are
asynchronous: the device→host copy blocks the step, the file writes do not. A write that fails in
the background (a full disk) is reported by the next call to ``save`` (made every step, due or not)
or ``close``, as one ``checkpointing.CheckpointWriteFailed``; the failed step is never listed, so
the latest complete checkpoint stays the resume point.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from medllama_jax import checkpointing, storage

CHECKSUMS_KEY = "checksums"


class CheckpointableIterator(Protocol):
  """What the manager needs of an input pipeline: write and read back its position."""

  def save(self, directory: str) -> None: ...

  def restore(self, directory: str) -> None: ...


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores an input pipeline's position; each process writes and reads the files of
  the data shards it reads, so every process calls it with the same (shared) directory."""

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    args.iterator.save(os.fspath(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> CheckpointableIterator:
    args.iterator.restore(os.fspath(directory))
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: CheckpointableIterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: CheckpointableIterator


class RunCheckpoints:
  """Periodic, asynchronous, keep-last-N checkpoints of a training run in ``directory``."""

  def __init__(self, directory: str, save_every: int, keep: int = 3, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1")
    options = ocp.CheckpointManagerOptions(
        # Only every ``save_every`` steps (Orbax would also save the first step it sees).
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.directory = storage.absolute(directory)
    checkpointing.shorten_orbax_write_errors()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))
    # The step of the last save started, until its outcome is known (``_wait``).
    self._writing_step: int | None = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, iterator: CheckpointableIterator, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Starts writing ``step`` (if due, or ``force``); returns whether a save was started.

    Called every step, it first reports a save that failed in the background since the last call.
    """
    self.check()
    if not (force or self._manager.should_save(step)):
      return False
    self._wait()  # Orbax would wait for the previous save too; a failure is reported as its own.
    record = {"step": step, **meta,
              CHECKSUMS_KEY: checkpointing.checksums_json(checkpointing.tensor_checksums(state))}
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=DataIteratorSave(iterator),
          meta=ocp.args.JsonSave(record)), force=force)
    except Exception as e:
      if checkpointing.os_error_text(e) is None:
        raise
      raise self._write_failed(step, e) from e
    if saved:
      self._writing_step = step
      logging.info("checkpoint of step %d started in %s", step, self.directory)
    return saved

  def check(self) -> None:
    """Raises ``CheckpointWriteFailed`` if a save failed in the background; never waits for a save
    still in progress."""
    if self._writing_step is not None and not self._manager.is_saving_in_progress():
      self._wait()

  def _wait(self) -> None:
    """Waits for the last save; raises ``CheckpointWriteFailed`` if it failed."""
    step, self._writing_step = self._writing_step, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_failed(step, e) from e

  def _write_failed(self, step: int | None, error: Exception
                    ) -> checkpointing.CheckpointWriteFailed:
    """One line: the step's folder, the OS error (or Orbax's first line) and the resume point."""
    reason = checkpointing.os_error_text(error) or checkpointing.root_cause_line(error)
    where = self.directory if step is None else self.step_dir(step)
    latest = self.latest_step()
    resume = ("no complete checkpoint remains" if latest is None
              else f"the latest complete checkpoint, step {latest}, stays the resume point")
    return checkpointing.CheckpointWriteFailed(
        f"{where}: checkpoint not written: {reason}; {resume}")

  def restore(self, step: int, abstract_state: Any, iterator: CheckpointableIterator,
              verify_checksums: bool = True) -> tuple[Any, dict[str, Any]]:
    """The train state (on the shardings of ``abstract_state``) and meta of ``step``; ``iterator``
    is moved to the position saved with it.

    The state is checked against the checksums saved with it (read in the dtypes it was saved in,
    then cast to those of ``abstract_state``) unless ``verify_checksums`` is False; a damaged or
    unreadable state raises ``checkpointing.CheckpointCorrupted`` / ``CheckpointUnreadable``.
    """
    step_dir = self.step_dir(step)
    with checkpointing.reading(step_dir):
      meta = dict(self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta)
    recorded = _recorded_checksums(step_dir, meta.pop(CHECKSUMS_KEY, None), verify_checksums)
    state_dir = os.path.join(step_dir, "state")
    target = abstract_state if recorded is None else _in_recorded_dtypes(abstract_state, recorded)
    with checkpointing.reading(state_dir):
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target))).state
    if recorded is not None:
      checkpointing.check_tensors(state_dir, _named_leaves(state), recorded)
      state = jax.tree.map(checkpointing.cast_to, state, abstract_state)
    self._manager.restore(step, args=ocp.args.Composite(data=DataIteratorRestore(iterator)))
    logging.info("restored step %d from %s", step, self.directory)
    return state, meta

  def reached_preemption(self, step: int) -> bool:
    """True on every host once JAX's preemption service has seen a SIGTERM on any host."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the last save (raising ``CheckpointWriteFailed`` if it failed), then closes."""
    try:
      self._wait()
    finally:
      self._manager.close()


def _recorded_checksums(step_dir: str, record: Any, verify: bool
                        ) -> dict[str, checkpointing.TensorChecksum] | None:
  """The checksums a step's meta recorded; None when not verifying or for a step saved without."""
  if not verify:
    return None
  if record is None:
    logging.warning("%s: no checksums (saved before they were recorded); the state is not "
                    "verified", step_dir)
    return None
  return checkpointing.checksums_from_json(record, f"{step_dir}/meta")


def _named_leaves(tree: Any) -> dict[str, Any]:
  return {checkpointing.tensor_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _in_recorded_dtypes(abstract: Any, recorded: dict[str, checkpointing.TensorChecksum]) -> Any:
  """``abstract`` with each leaf in the dtype its tensor was saved in, so the checksums apply."""

  def stored(path, leaf):
    entry = recorded.get(checkpointing.tensor_name(path))
    return leaf if entry is None or entry.dtype == leaf.dtype else leaf.update(dtype=entry.dtype)

  return jax.tree_util.tree_map_with_path(stored, abstract)
