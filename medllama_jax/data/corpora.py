"""Streaming readers for the raw corpora of Me-LLaMA's continual pre-training, one per source format.

The pre-training mix comes in seven shapes: PubMed's MEDLINE XML, PMC Open Access as JATS XML or as plain
text, Pile/RedPajama JSON lines, MIMIC-III and MIMIC-IV-Note CSV notes, and MIMIC-CXR report trees. Each
reader turns one input (a file; for the tree formats also a folder or a tar/zip package) into a stream of
records, reading as it goes so that memory stays flat whatever the file size:

* ``Document(id, text)``: one text to train on (raw; cleaning is records.py's job);
* ``Rejected(source, location, reason)``: a record that was skipped (malformed, or filtered out), with the
  input, where in it (line, row, member, article number) and a short reason key.

Rejections never carry record text: the clinical corpora are credentialed data, so what reaches logs and
summaries is ids, file names, positions and reasons only.

A reader never raises on one bad record. An error that ends a file early (a truncated or corrupt
gzip, zstd, tar or zip stream; MEDLINE XML that is not well formed; an input the system cannot read,
such as a folder given to a one-file format) is turned by :func:`read` into a final ``Rejected`` for
the whole input (``truncated_file``, ``corrupt_file``, ``bad_xml``, ``unreadable_file``, at the
parser's line and column or "after N records"); the records already read from that file stand, and the
run goes on with the next input, because one damaged file of a thousand PubMed updates should not cost
the other 999. An input that cannot be read at all for want of software (``.zst`` without the optional
``zstandard`` package) raises :class:`CorpusError` and stops the run.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import inspect
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

from medllama_jax import storage


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str


@dataclasses.dataclass(frozen=True)
class Rejected:
  source: str
  location: str
  reason: str


Record = Document | Rejected


class CorpusError(Exception):
  """An input that cannot be read at all; the run stops."""


# Reasons for records left out on purpose (a filter option, the source's own error or retraction flag):
# summaries count them apart from damaged records, which are errors.
SKIPPED_REASONS = frozenset({"not_selected", "iserror", "retracted"})


_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)  # MIMIC notes are far longer than csv's 128 KiB default.
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # Undecodable bytes (surrogateescape) or bad JSON escapes.
_ARCHIVES = (".tar", ".tar.gz", ".tgz")
_ZSTD_MAX_WINDOW = 2**31  # The Pile's .zst files use long-distance windows.
_ZSTD_READ_SIZE = 1 << 16
_REMOTE_BUFFER = 1 << 22  # Bucket reads are round trips: few and large.


# Opening files. Local paths go through the OS; bucket paths (gs://, s3://) through TensorFlow's file
# systems, so that a Beam worker reads its input where it lies.

def _tensorflow() -> Any:
  import tensorflow

  return tensorflow


def _open_raw(path: str) -> BinaryIO:
  """``path``'s bytes as a binary stream (compressed or not)."""
  if storage.is_remote(path):
    return io.BufferedReader(_RemoteFile(_tensorflow().io.gfile.GFile(path, "rb")),
                             buffer_size=_REMOTE_BUFFER)
  return open(path, "rb")


class _RemoteFile(io.RawIOBase):
  """A ``tf.io.gfile.GFile`` as a raw binary stream, so that ``io``, ``csv``, ``tarfile`` and
  ``zipfile`` (which seeks) take it like a local file."""

  def __init__(self, file: Any):
    self._file = file

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    data = self._file.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    self._file.seek(offset, whence)
    return self._file.tell()

  def tell(self) -> int:
    return self._file.tell()

  def close(self) -> None:
    self._file.close()
    super().close()


def _isdir(path: str) -> bool:
  return _tensorflow().io.gfile.isdir(path) if storage.is_remote(path) else os.path.isdir(path)


def _walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """``os.walk`` for either kind of path (sorting ``dirs`` in place orders the walk in both)."""
  return _tensorflow().io.gfile.walk(path) if storage.is_remote(path) else os.walk(path)


def _listdir(path: str) -> list[str]:
  return _tensorflow().io.gfile.listdir(path) if storage.is_remote(path) else os.listdir(path)


def _isfile(path: str) -> bool:
  if storage.is_remote(path):
    return _tensorflow().io.gfile.exists(path) and not _isdir(path)
  return os.path.isfile(path)


class _GzipStream(gzip.GzipFile):
  """A gzip stream over an open file that it closes with itself (``GzipFile`` leaves it open)."""

  def __init__(self, raw: BinaryIO):
    super().__init__(fileobj=raw, mode="rb")
    self._raw = raw

  def close(self) -> None:
    try:
      super().close()
    finally:
      self._raw.close()


def _zstandard() -> Any:
  """The optional ``zstandard`` module, or None when it is not installed."""
  try:
    import zstandard
  except ImportError:
    return None
  return zstandard


def _open_binary(path: str) -> BinaryIO:
  """``path`` as a binary stream, decompressing ``.gz`` and ``.zst`` on the fly."""
  if path.endswith(".gz"):
    return _GzipStream(_open_raw(path))
  if path.endswith(".zst"):
    zstandard = _zstandard()
    if zstandard is None:
      raise CorpusError(f"{path}: reading .zst files needs the optional 'zstandard' package "
                        "(pip install zstandard)")
    return io.BufferedReader(_ChunkStream(_zstd_chunks(zstandard, path)))
  return _open_raw(path)


def _zstd_chunks(zstandard: Any, path: str) -> Generator[bytes, None, None]:
  """Decompressed data of the zstd frames in ``path``; EOFError if the file ends inside a frame.

  (zstandard's own ``stream_reader`` ends quietly at a truncation: the lost tail would go unnoticed.)
  """
  with _open_raw(path) as raw:
    frame = None
    while data := raw.read(_ZSTD_READ_SIZE):
      while data:
        frame = frame or zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
        yield frame.decompress(data)
        data = frame.unused_data if frame.eof else b""
        frame = None if frame.eof else frame
    if frame is not None:
      raise EOFError(f"{path}: the last zstd frame is incomplete")


class _ChunkStream(io.RawIOBase):
  """A readable binary stream over a generator of byte strings."""

  def __init__(self, chunks: Generator[bytes, None, None]):
    super().__init__()
    self._chunks = chunks
    self._chunk = b""
    self._offset = 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    while self._offset == len(self._chunk):
      chunk = next(self._chunks, None)
      if chunk is None:
        return 0
      self._chunk, self._offset = chunk, 0
    size = min(len(buffer), len(self._chunk) - self._offset)
    buffer[:size] = self._chunk[self._offset:self._offset + size]
    self._offset += size
    return size

  def close(self) -> None:
    self._chunks.close()
    super().close()


def _files(path: str, suffixes: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
  """``(name, content)`` of each file ending in ``suffixes`` under a folder or inside a tar/zip package.

  Names are relative to the folder or package, with ``/`` separators; a plain file is itself, named by
  its base name. Packages are read as streams, one member in memory at a time.
  """
  if _isdir(path):
    for root, dirs, names in _walk(path):
      dirs.sort()
      for name in sorted(names):
        if name.endswith(suffixes):
          full = os.path.join(root, name)
          with _open_raw(full) as f:
            yield os.path.relpath(full, path).replace(os.sep, "/"), f.read()
  elif path.endswith(_ARCHIVES):
    with _open_raw(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
      for member in tar:
        if member.isfile() and member.name.endswith(suffixes):
          yield member.name, tar.extractfile(member).read()
  elif path.endswith(".zip"):
    with _open_raw(path) as raw, zipfile.ZipFile(raw) as package:
      for info in package.infolist():
        if not info.is_dir() and info.filename.endswith(suffixes):
          yield info.filename, package.read(info)
  else:
    with _open_raw(path) as f:
      yield os.path.basename(path), f.read()


def _utf8(data: bytes) -> str | None:
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError:
    return None


def _selection(names: str | Sequence[str] | None) -> frozenset[str] | None:
  """A filter option (one name or several) as a set of comparison keys; ``None`` selects everything."""
  if names is None:
    return None
  return frozenset(_key(n) for n in ([names] if isinstance(names, str) else names))


def _key(name: Any) -> str | None:
  """Case- and padding-blind: MIMIC-III spells some categories with a trailing space ("Physician ")."""
  return name.strip().casefold() if isinstance(name, str) else None


def _squeeze(text: str) -> str:
  """XML text with its layout whitespace (indentation, line breaks) reduced to single spaces."""
  return " ".join(text.split())


# PubMed baseline and update files (MEDLINE XML).

_PUBMED_RECORDS = frozenset({"PubmedArticle", "PubmedBookArticle", "DeleteCitation"})


def read_pubmed_xml(path: str) -> Iterator[Record]:
  """Each ``PubmedArticle`` as ``pmid:<PMID>``: its title, then one line per AbstractText.

  Labelled abstract parts read ``LABEL: text``; inline markup keeps its text. Articles without an
  abstract are rejected as ``no_abstract``, without a PMID as ``no_pmid`` (location: article number).
  Book records and deletions are passed over. Elements are cleared as they are read.
  """
  with _open_binary(path) as stream:
    events = ET.iterparse(stream, events=("start", "end"))
    _, root = next(events)
    number = 0
    for event, element in events:
      if event != "end" or element.tag not in _PUBMED_RECORDS:
        continue
      if element.tag == "PubmedArticle":
        number += 1
        yield _pubmed_article(path, number, element)
      root.clear()


def _pubmed_article(path: str, number: int, article: ET.Element) -> Record:
  location = f"PubmedArticle {number}"
  pmid = _squeeze(article.findtext("MedlineCitation/PMID") or "")
  if not pmid:
    return Rejected(path, location, "no_pmid")
  parts = []
  for part in article.iterfind("MedlineCitation/Article/Abstract/AbstractText"):
    text = _squeeze("".join(part.itertext()))
    if text:
      label = part.get("Label")
      parts.append(f"{label}: {text}" if label else text)
  if not parts:
    return Rejected(path, f"{location} (pmid:{pmid})", "no_abstract")
  title = article.find("MedlineCitation/Article/ArticleTitle")
  heading = [_squeeze("".join(title.itertext()))] if title is not None else []
  return Document(f"pmid:{pmid}", "\n".join(filter(None, heading + parts)))


# PMC Open Access, JATS XML.

# Not prose: tables, figures and their captions, formulas (MathML, TeX), graphics, supplementary files.
_JATS_DROPPED = frozenset({
    "table-wrap", "table-wrap-group", "table", "fig", "fig-group", "disp-formula",
    "disp-formula-group", "inline-formula", "tex-math", "math", "graphic", "inline-graphic", "media",
    "supplementary-material", "ref-list",
})


def read_pmc_nxml(path: str) -> Iterator[Record]:
  """PMC articles (``.nxml``/``.xml``; a file, a folder tree or a tar/zip package), one Document each.

  Text: the title, the abstract and the body's section titles and paragraphs, one block per paragraph
  (blank line between); tables, figures, formulas and the back matter (references) are left out. Id:
  ``pmcid:PMC<n>`` from ``article-id[@pub-id-type='pmc']``, else the file's name in the package. A file
  that is not well-formed XML is rejected as ``bad_xml`` (location: name, line, column).
  """
  for name, data in _files(path, (".nxml", ".xml")):
    try:
      article = ET.fromstring(data)
    except ET.ParseError as error:
      line, column = error.position
      yield Rejected(path, f"{name} line {line}, column {column}", "bad_xml")
      continue
    parts = [article.find("front/article-meta/title-group"),
             *article.iterfind("front/article-meta/abstract"), article.find("body")]
    pmcid = _pmcid(article)
    text = "\n\n".join(block for part in parts for block in _jats_blocks(part))
    yield Document(f"pmcid:{pmcid}" if pmcid else name, text)


def _pmcid(article: ET.Element) -> str | None:
  for element in article.iterfind("front/article-meta/article-id"):
    value = (element.text or "").strip()
    if element.get("pub-id-type") in ("pmc", "pmcid") and value:
      return value if value.upper().startswith("PMC") else f"PMC{value}"
  return None


def _local_name(tag: str) -> str:
  return tag.rpartition("}")[2]


def _jats_blocks(element: ET.Element | None) -> list[str]:
  """Titles and paragraphs under ``element``, in document order, skipping the dropped elements."""
  blocks: list[str] = []
  for child in element if element is not None else ():
    tag = _local_name(child.tag)
    if tag in _JATS_DROPPED:
      continue
    if tag in ("title", "article-title", "p"):
      text = _squeeze(_inline_text(child))
      if text:
        blocks.append(text)
    else:
      blocks += _jats_blocks(child)
  return blocks


def _inline_text(element: ET.Element) -> str:
  """The text of ``element`` and its inline markup (italics, links, citations), less dropped elements."""
  parts = [element.text or ""]
  for child in element:
    if _local_name(child.tag) not in _JATS_DROPPED:
      parts.append(_inline_text(child))
    parts.append(child.tail or "")
  return "".join(parts)


# PMC Open Access, plain text.

_PMC_MARKER = re.compile(r"==== (Front|Body|Refs)")
_FILE_LIST = ".filelist.csv"
_FILE_LIST_COLUMNS = ("Article File", "Retracted")
_PROSE_WORDS = 4  # Front lines with fewer words are ids, names, dates, keywords: not prose.
_FRONT_METADATA = re.compile(r"©|copyright\b|\S*://", re.IGNORECASE)


def read_pmc_txt(path: str) -> Iterator[Record]:
  """PMC plain-text articles (``.txt``; a file, a folder tree or a tar/zip package), id = the file's name.

  The bulk packages (``oa_comm_txt.PMC009xxxxxx.baseline.<date>.tar.gz`` and the ``incr`` ones) hold
  ``PMC009xxxxxx/PMC<n>.txt`` files that NCBI renders from the JATS XML, split by marker lines:
  ``==== Front`` (journal and article metadata: journal ids and title, ISSN, publisher, article ids and
  DOI, category, title, authors, affiliations, dates, licence, abstract, keywords), ``==== Body`` and,
  when the article has references, ``==== Refs`` (retraction notices and other short items often have
  none). Kept: the prose of the front (:func:`_front_prose`: title and abstract) and the body; the
  markers and the references are left out. A file without a ``==== Body`` marker is taken whole.

  Retractions: beside a package ``X.tar.gz`` NCBI publishes ``X.filelist.csv`` (columns ``Article File,
  Article Citation, AccessionID, LastUpdated (YYYY-MM-DD HH:MM:SS), PMID, License, Retracted``); for a
  folder, each ``filelist.csv`` or ``*.filelist.csv`` directly in it is read. Articles listed with
  ``Retracted`` = ``yes`` are rejected as ``retracted`` (matched by file base name, as PMC ids are
  unique). A file that is not UTF-8 is rejected as ``not_utf8``.
  """
  retracted = _retracted_articles(path)
  for name, data in _files(path, (".txt",)):
    text = _utf8(data)
    if text is None:
      yield Rejected(path, name, "not_utf8")
    elif posixpath.basename(name) in retracted:
      yield Rejected(path, name, "retracted")
    else:
      yield Document(name, _pmc_article_text(text))


def _file_lists(path: str) -> list[str]:
  """The file lists that go with an input: ``X.filelist.csv`` beside package ``X``, or those in a folder."""
  if _isdir(path):
    return [os.path.join(path, name) for name in sorted(_listdir(path))
            if name == _FILE_LIST[1:] or name.endswith(_FILE_LIST)]
  for suffix in (*_ARCHIVES, ".zip"):
    if path.endswith(suffix):
      candidate = path[:-len(suffix)] + _FILE_LIST
      return [candidate] if _isfile(candidate) else []
  return []


def _retracted_articles(path: str) -> frozenset[str]:
  """Base names of the articles that the input's file lists mark ``Retracted`` = ``yes``."""
  retracted = set()
  for file_list in _file_lists(path):
    with io.TextIOWrapper(_open_raw(file_list), encoding="utf-8-sig", newline="") as f:
      rows = csv.DictReader(f)
      missing = [c for c in _FILE_LIST_COLUMNS if c not in (rows.fieldnames or [])]
      if missing:
        raise CorpusError(f"{file_list}: not a PMC file list (no {', '.join(missing)} column)")
      retracted.update(posixpath.basename(row["Article File"].strip()) for row in rows
                       if (row["Retracted"] or "").strip().lower() == "yes")
  return frozenset(retracted)


def _pmc_article_text(text: str) -> str:
  """Front prose and body of a marked-up article; the text unchanged when it has no ``==== Body``."""
  sections: dict[str, list[str]] = {}
  current: list[str] = []
  for line in text.splitlines(keepends=True):
    marker = _PMC_MARKER.fullmatch(line.strip())
    if marker:
      current = sections.setdefault(marker.group(1), [])
    else:
      current.append(line)
  if "Body" not in sections:
    return text
  front = _front_prose(sections.get("Front", []))
  return "\n\n".join(filter(None, [front, "".join(sections["Body"]).strip("\n")])) + "\n"


def _front_prose(lines: list[str]) -> str:
  """The title and abstract lines of a front section, one paragraph.

  The journal block (ids, title, ISSN, publisher) runs to the first blank line and is dropped whole.
  After it, lines of fewer than :data:`_PROSE_WORDS` words (ids, DOIs, the category, author names,
  dates, keywords) and copyright and licence lines are dropped. A line of metadata written as a phrase
  (an affiliation, a funding statement) stays: the front has no other markup to tell it apart.
  """
  blank = next((i for i, line in enumerate(lines) if not line.strip()), None)
  article = lines[blank + 1:] if blank is not None else lines
  kept = [line.strip() for line in article
          if len(line.split()) >= _PROSE_WORDS and not _FRONT_METADATA.match(line.strip())]
  return "\n".join(kept)


# JSON lines: the Pile, RedPajama.

def read_jsonl(path: str, *, pile_set_name: str | Sequence[str] | None = None) -> Iterator[Record]:
  """One Document per JSON line with a string ``text``; id = ``<file base name>:<line number>``.

  ``pile_set_name`` keeps only lines whose ``meta.pile_set_name`` is one of the given names (others are
  rejected as ``not_selected``). Malformed lines: ``not_utf8``, ``bad_json``, ``no_text``. Blank lines are
  not records. ``.gz`` and ``.zst`` (with the optional ``zstandard`` package) are decompressed.
  """
  wanted = _selection(pile_set_name)
  name = os.path.basename(path)
  with _open_binary(path) as stream:
    for number, line in enumerate(stream, 1):
      if line.strip():
        yield _json_line(path, name, number, line, wanted)


def _json_line(path: str, name: str, number: int, line: bytes,
               wanted: frozenset[str] | None) -> Record:
  location = f"line {number}"
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError:
    return Rejected(path, location, "not_utf8")
  except ValueError:
    return Rejected(path, location, "bad_json")
  text = record.get("text") if isinstance(record, dict) else None
  if not isinstance(text, str):
    return Rejected(path, location, "no_text")
  if _SURROGATE.search(text):
    return Rejected(path, location, "not_utf8")
  if wanted is not None:
    meta = record.get("meta")
    if _key(meta.get("pile_set_name") if isinstance(meta, dict) else None) not in wanted:
      return Rejected(path, location, "not_selected")
  return Document(f"{name}:{number}", text)


# MIMIC notes (CSV).

@dataclasses.dataclass(frozen=True)
class _NoteTable:
  """Where a MIMIC notes table keeps what we need (column names compared case-blind).

  ``row_start`` matches the first line of a row (its id columns); with the row's field count it tells a
  new row from a line of note text after a quote that was never closed.
  """
  id_prefix: str
  id_column: str
  text_column: str
  category_column: str
  row_start: re.Pattern[str]
  error_column: str | None = None


_MIMIC_III = _NoteTable("mimic3", "row_id", "text", "category", re.compile(r"\d+,\d+,"),
                        error_column="iserror")
_MIMIC_IV = _NoteTable("mimic4", "note_id", "text", "note_type", re.compile(r"\d+-[A-Z]+-\d+,\d+,"))


def read_mimic_iii_notes(path: str, *,
                         mimic_category: str | Sequence[str] | None = None) -> Iterator[Record]:
  """MIMIC-III ``NOTEEVENTS.csv[.gz]``: one Document per note, id ``mimic3:<ROW_ID>``.

  Notes flagged ``ISERROR`` = 1 are rejected as ``iserror``; ``mimic_category`` keeps only the given
  ``CATEGORY`` values (e.g. "Discharge summary", "Radiology"). See :func:`_read_notes` for bad rows.
  """
  return _read_notes(path, _MIMIC_III, mimic_category)


def read_mimic_iv_notes(path: str, *,
                        mimic_category: str | Sequence[str] | None = None) -> Iterator[Record]:
  """MIMIC-IV-Note ``discharge.csv.gz``, ``radiology.csv.gz``: a Document per note, ``mimic4:<note_id>``.

  ``mimic_category`` keeps only the given ``note_type`` values (``DS``, ``AR``, ``RR``...).
  """
  return _read_notes(path, _MIMIC_IV, mimic_category)


@dataclasses.dataclass(frozen=True)
class _CsvRow:
  """One CSV record: its first line, and its fields (None when its quoting is broken)."""
  line: int
  fields: list[str] | None
  reason: str = ""


def _read_notes(path: str, table: _NoteTable,
                category: str | Sequence[str] | None) -> Iterator[Record]:
  """CSV rows (quoted multi-line notes) as Documents; rows are numbered from 1 after the header.

  Rejected rows (location: row number and the line it starts on): ``wrong_field_count`` (short or long
  rows), ``unterminated_quote`` (a quoted field still open where a new row starts or the file ends),
  ``bad_quoting`` (a stray quote, e.g. text after a closing quote), ``not_utf8``, ``no_id``,
  ``iserror``, ``not_selected``. A header without the needed columns rejects the file as
  ``missing_columns``.
  """
  wanted = _selection(category)
  with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape",
                        newline="") as text:
    lines = enumerate(text, 1)
    header_line = next(lines, (1, ""))[1]
    header = [name.strip().lower() for name in _parse_csv_record(header_line) or []]
    needed = [table.id_column, table.text_column, table.category_column]
    needed += [table.error_column] if table.error_column else []
    missing = [name for name in needed if name not in header]
    if missing:
      yield Rejected(path, f"header (no {', '.join(missing)})", "missing_columns")
      return
    column = {name: header.index(name) for name in needed}
    for number, row in enumerate(_csv_rows(lines, table.row_start, len(header)), 1):
      yield _note(path, f"row {number} (line {row.line})", row, table, column, len(header), wanted)


def _note(path: str, location: str, row: _CsvRow, table: _NoteTable, column: dict[str, int],
          width: int, wanted: frozenset[str] | None) -> Record:
  fields = row.fields
  if fields is None:
    return Rejected(path, location, row.reason)
  if len(fields) != width:
    return Rejected(path, location, "wrong_field_count")
  if any(_SURROGATE.search(field) for field in fields):
    return Rejected(path, location, "not_utf8")
  note_id = fields[column[table.id_column]].strip()
  if not note_id:
    return Rejected(path, location, "no_id")
  if table.error_column and fields[column[table.error_column]].strip() == "1":
    return Rejected(path, location, "iserror")
  if wanted is not None and _key(fields[column[table.category_column]]) not in wanted:
    return Rejected(path, location, "not_selected")
  return Document(f"{table.id_prefix}:{note_id}", fields[column[table.text_column]])


def _csv_rows(lines: Iterator[tuple[int, str]], row_start: re.Pattern[str],
              width: int) -> Iterator[_CsvRow]:
  """The CSV records of numbered physical lines, parsed strictly, one at a time.

  A record ends at the first line where its quotes balance. While a quoted field is open, a line that
  matches ``row_start`` and holds ``width`` fields starts a new row: the open record is rejected as
  ``unterminated_quote`` and reading resumes there, so one missing quote costs one note, never the
  notes after it, and no record ever takes in another's lines. (A note line that happens to look
  exactly like the start of a row would be taken for one; MIMIC's text column is last, so such a line
  would need all the other columns before it.)
  """
  pending: list[str] = []
  first = 0
  open_quote = False  # Quotes so far are odd in number: a quoted field is open.
  for number, line in lines:
    if pending and row_start.match(line) and _fields_on_line(line) == width:
      yield _CsvRow(first, None, "unterminated_quote")
      pending = []
    if not pending:
      first, open_quote = number, False
    pending.append(line)
    open_quote ^= line.count('"') % 2 == 1
    if not open_quote:
      record = "".join(pending)
      pending = []
      if record.strip():
        fields = _parse_csv_record(record)
        yield _CsvRow(first, fields, "" if fields is not None else "bad_quoting")
  if pending:
    yield _CsvRow(first, None, "unterminated_quote")


def _parse_csv_record(record: str) -> list[str] | None:
  """The fields of one complete CSV record, or None when its quoting is not well formed."""
  csv.field_size_limit(_CSV_FIELD_LIMIT)
  try:
    rows = list(csv.reader(io.StringIO(record, newline=""), strict=True))
  except csv.Error:
    return None
  return rows[0] if len(rows) == 1 else None


def _fields_on_line(line: str) -> int:
  """How many fields a line starts: the commas outside quotes, plus one (a field may stay open)."""
  quoted = False
  commas = 0
  for character in line:
    if character == '"':
      quoted = not quoted
    elif character == "," and not quoted:
      commas += 1
  return commas + 1


# MIMIC-CXR reports.

_CXR_REPORT = re.compile(r"s(\d+)\.txt")


def read_mimic_cxr(path: str) -> Iterator[Record]:
  """MIMIC-CXR reports (``files/pXX/pNNNNNNNN/sNNNNNNNN.txt``; a folder tree or a tar/zip package).

  One Document per study, id ``cxr:<study id>`` (the digits of ``sNNNNNNNN``), the whole report as text.
  Rejected: ``not_utf8``, and ``not_a_report`` for ``.txt`` files not named ``s<digits>.txt``.
  """
  for name, data in _files(path, (".txt",)):
    study = _CXR_REPORT.fullmatch(posixpath.basename(name))
    if not study:
      yield Rejected(path, name, "not_a_report")
      continue
    text = _utf8(data)
    yield Rejected(path, name, "not_utf8") if text is None else Document(f"cxr:{study.group(1)}", text)


READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "pubmed_xml": read_pubmed_xml,
    "pmc_nxml": read_pmc_nxml,
    "pmc_txt": read_pmc_txt,
    "jsonl": read_jsonl,
    "mimic_iii_notes": read_mimic_iii_notes,
    "mimic_iv_notes": read_mimic_iv_notes,
    "mimic_cxr": read_mimic_cxr,
}


def check_options(format: str, options: Mapping[str, Any]) -> None:
  """Raises ValueError for an unknown format or an option its reader does not take."""
  if format not in READERS:
    raise ValueError(f"unknown format {format!r}; known formats: {', '.join(READERS)}")
  parameters = inspect.signature(READERS[format]).parameters.values()
  accepted = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"format {format!r} does not take {', '.join(unknown)} "
                     f"(it takes: {', '.join(accepted) or 'no options'})")


def _file_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that end one input early without stopping the run (see the module docstring)."""
  errors: tuple[type[BaseException], ...] = (
      EOFError, OSError, zlib.error, tarfile.TarError, zipfile.BadZipFile, ET.ParseError)
  zstandard = _zstandard()
  if zstandard is not None:
    errors += (zstandard.ZstdError,)
  tensorflow = sys.modules.get("tensorflow")  # A bucket file's read errors are TensorFlow's.
  return errors + (tensorflow.errors.OpError,) if tensorflow is not None else errors


def _file_error_reason(error: BaseException) -> str:
  if isinstance(error, EOFError):
    return "truncated_file"
  if isinstance(error, ET.ParseError):
    return "bad_xml"
  if isinstance(error, OSError) and not isinstance(error, gzip.BadGzipFile):
    return "unreadable_file"
  tensorflow = sys.modules.get("tensorflow")
  if tensorflow is not None and isinstance(error, tensorflow.errors.OpError):
    return "unreadable_file"
  return "corrupt_file"


def read(format: str, path: str, **options: Any) -> Iterator[Record]:
  """The records of one input in ``format``; an error that ends the file becomes a final Rejected.

  Records read before the error are kept (they were already yielded). The location is the XML parser's
  line and column where it has one, else the number of records read from the file.
  """
  count = 0
  try:
    for record in READERS[format](path, **options):
      count += 1
      yield record
  except _file_errors() as error:
    if isinstance(error, ET.ParseError):
      location = "line {}, column {}".format(*error.position)
    else:
      location = f"after {count} records"
    yield Rejected(path, location, _file_error_reason(error))
