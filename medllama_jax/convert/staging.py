"""All-or-nothing output folders: a conversion either produces a complete folder or none at all."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator


def _make_staging_folder(out_dir: str) -> str:
  """Creates an empty folder with a fresh name beside ``out_dir`` and returns its path.

  A plain ``mkdir`` rather than ``tempfile.mkdtemp``: the folder becomes ``out_dir`` by a rename,
  which keeps its mode, and ``mkdtemp`` makes folders private (0700) whatever the user's umask;
  ``mkdir`` gives the mode (and default ACL) any folder the user creates there gets.
  """
  parent, name = os.path.split(out_dir)
  while True:
    staging = os.path.join(parent, f"{name}.partial-{secrets.token_hex(4)}")
    try:
      os.mkdir(staging)
      return staging
    except FileExistsError:
      continue


@contextlib.contextmanager
def staged_directory(out_dir: str) -> Iterator[str]:
  """Yields a staging folder beside ``out_dir``, renamed to ``out_dir`` only if the block succeeds.

  On any error the staging folder is deleted, so a failed or interrupted conversion never leaves a
  folder that looks complete at ``out_dir``.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir}: already exists; choose a new output folder or delete it")
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  staging = _make_staging_folder(out_dir)
  try:
    yield staging
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
