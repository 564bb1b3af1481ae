"""MTSamples (Kaggle's ``mtsamples.csv``) → the same rows, split into test and few-shot pool.

Rows keep every column of the release; ``medical_specialty`` must be one of the 40 specialties
(``scorers.MTSAMPLE_SPECIALTIES``, compared stripped: Kaggle pads them with a space). Rows without a
transcription are left out and counted (``rows_without_transcription``). MTSamples lists many
transcriptions under several specialties, so the split unit is the transcription text: copies never
straddle test and pool.

A row with another number of fields than the header, or with a quote out of place (the file is read
strictly, as the writer of a well-formed CSV file quotes), is logged with its file, row and line,
left out and counted (``malformed_rows``); reading goes on at the next line. A header without the
columns needed, or a specialty outside the 40 (another label set than the release's prompt lists),
stops the conversion.
"""

from __future__ import annotations

from absl import logging

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError, csv_rows

_NEEDED = ("medical_specialty", "transcription")


def read(path: str) -> Portion:
  """The rows of Kaggle's file that hold a transcription; malformed rows are left out, counted."""
  header, rows = csv_rows(path, strict=True)
  missing = [name for name in _NEEDED if name not in header]
  if missing:
    raise RawFormatError(path, "header", f"no column {', '.join(missing)}")
  portion = Portion()
  for _, where, row in rows:
    if isinstance(row, RawFormatError):
      portion.leave_out("MTSamples", "row", row)
      continue
    if not row["transcription"].strip():
      logging.info("MTSamples: %s: %s left out: field transcription is empty", path, where)
      portion.skipped["rows_without_transcription"] += 1
      continue
    if row["medical_specialty"].strip() not in scorers.MTSAMPLE_SPECIALTIES:
      raise RawFormatError(path, where, f"field medical_specialty: "
                           f"{row['medical_specialty'].strip()!r} is not one of the 40 MTSamples "
                           "specialties")
    portion.units.append((row["transcription"].strip(), row))
  return portion
