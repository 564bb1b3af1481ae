"""Local or bucket paths for everything a run reads and writes besides array data.

On TPU VMs the run directory, the model folders and the evaluation results live in a bucket
(``gs://...``), since the workers' disks go away with the slice. Orbax and TensorBoard take such paths
as they are; the small files around them (configs, metrics, tokenizers, results) go through
``etils.epath``, which uses ``os`` for local paths and ``tf.io.gfile`` for ``gs://`` and ``s3://``.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute (so it survives a change of directory); a bucket path as it is."""
  return path if is_remote(path) else os.path.abspath(path)


def local_copy(path: str | os.PathLike) -> str:
  """A local file with ``path``'s bytes, for libraries that read only local files (SentencePiece,
  ``tokenizers``): ``path`` itself when local, else a copy in a temporary folder of this process."""
  if not is_remote(path):
    return os.fspath(path)
  source = epath.Path(path)
  target = os.path.join(tempfile.mkdtemp(prefix="medllama_"), source.name)
  source.copy(target)
  return target


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``path`` through a temporary file renamed into place, so a reader finds either no file
  or the whole text, never a half-written one (a manifest that a crash cut short would read as a
  damaged checkpoint)."""
  staging = epath.Path(f"{os.fspath(path)}.tmp")
  staging.write_text(text)
  staging.replace(path)
