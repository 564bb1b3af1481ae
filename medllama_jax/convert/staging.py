"""All-or-nothing output folders: a conversion either produces a complete folder or none at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def staged_directory(out_dir: str) -> Iterator[str]:
  """Yields a staging folder beside ``out_dir``, renamed to ``out_dir`` only if the block succeeds.

  On any error the staging folder is deleted, so a failed or interrupted conversion never leaves a
  folder that looks complete at ``out_dir``.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir}: already exists; choose a new output folder or delete it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
  try:
    yield staging
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
