"""Run checkpoints: the whole train state and the data position, saved together by one Orbax manager.

A step's checkpoint holds three items:

* ``state``: the ``TrainState`` (step, parameters, optimizer state), written by every host from its
  own shards (the primary host writes the metadata) and restored straight onto the target shardings
  (``partitioning.placed``), whatever mesh or number of hosts wrote it;
* ``data``: the input-pipeline position of every data shard (``DataIterator.save``: each process
  writes the shards it reads), so a resumed run reads exactly the examples an uninterrupted run would
  have read next, with as many processes as divide the number of data shards;
* ``meta``: a small JSON record (step, tokens seen, the data description) for humans and checks.

Orbax writes every step into a temporary folder and renames it into place only when all items are
complete, so a run killed in the middle of a save (``kill -9``, a preempted VM) leaves a temporary
folder that is never listed, and ``latest_step`` is always a checkpoint that restores. Saves are
asynchronous: the device→host copy blocks the step, the file writes do not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from medllama_jax import storage


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
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, iterator: CheckpointableIterator, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Starts writing ``step`` (if due, or ``force``); returns whether a save was started."""
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataIteratorSave(iterator),
        meta=ocp.args.JsonSave({"step": step, **meta})), force=force)
    if saved:
      logging.info("checkpoint of step %d started in %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, iterator: CheckpointableIterator
              ) -> tuple[Any, dict[str, Any]]:
    """The train state (on the shardings of ``abstract_state``) and meta of ``step``; ``iterator``
    is moved to the position saved with it."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=DataIteratorRestore(iterator),
        meta=ocp.args.JsonRestore()))
    logging.info("restored step %d from %s", step, self.directory)
    return restored.state, dict(restored.meta)

  def reached_preemption(self, step: int) -> bool:
    """True on every host once JAX's preemption service has seen a SIGTERM on any host."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
