"""MTSamples (Kaggle's ``mtsamples.csv``) → the same rows, split into test and few-shot pool.

Rows keep every column of the release; ``medical_specialty`` must be one of the 40 specialties
(``scorers.MTSAMPLE_SPECIALTIES``, compared stripped: Kaggle pads them with a space). Rows without a
transcription are left out and counted. MTSamples lists many transcriptions under several
specialties, so the split unit is the transcription text: copies never straddle test and pool.
"""

from __future__ import annotations

import csv
import io

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError, read_text

_NEEDED = ("medical_specialty", "transcription")


def read(path: str) -> Portion:
  rows = csv.DictReader(io.StringIO(read_text(path), newline=""))
  missing = [name for name in _NEEDED if name not in (rows.fieldnames or ())]
  if missing:
    raise RawFormatError(path, "header", f"no column {', '.join(missing)}")
  portion = Portion()
  try:
    for number, row in enumerate(rows, 1):
      if None in row or None in row.values():
        raise RawFormatError(path, f"row {number} (line {rows.line_num})", "wrong number of fields")
      if not row["transcription"].strip():
        portion.skipped["rows_without_transcription"] += 1
        continue
      if row["medical_specialty"].strip() not in scorers.MTSAMPLE_SPECIALTIES:
        raise RawFormatError(path, f"row {number} (line {rows.line_num})",
                             f"field medical_specialty: {row['medical_specialty'].strip()!r} is "
                             "not one of the 40 MTSamples specialties")
      portion.units.append((row["transcription"].strip(), row))
  except csv.Error as e:
    raise RawFormatError(path, f"line {rows.line_num}", f"CSV: {e}") from None
  return portion
