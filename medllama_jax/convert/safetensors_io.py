"""Streaming reader and writer for the safetensors format.

LLaMA checkpoints are tens of gigabytes. Converting them with the reference
`safetensors` package means either materialising whole shards or pulling in
torch (numpy cannot hold bfloat16 there). This module needs only numpy,
ml_dtypes and the standard library, and moves one tensor at a time between
disk and memory, so peak memory during a conversion is bounded by the largest
single tensor rather than by the checkpoint.

File layout: an 8-byte little-endian uint64 `N`, then `N` bytes of UTF-8 JSON
mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`
(plus an optional `"__metadata__"` dict of strings), then the data buffer.
Offsets are relative to the start of the data buffer; tensors are stored
C-contiguous and little-endian.
"""

import dataclasses
import json
import math
import os
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import BinaryIO

import ml_dtypes
import numpy as np
import numpy.typing as npt

_METADATA_KEY = "__metadata__"
_HEADER_LENGTH_BYTES = 8
_HEADER_ALIGNMENT = 8

# Explicitly little-endian, because that is what the format stores.
DTYPE_TO_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NUMPY_TO_DTYPE = {dtype: name for name, dtype in DTYPE_TO_NUMPY.items()}


class SafetensorsError(ValueError):
    """A malformed file or a misuse of the writer; the message names the file."""


def _error(path: str, problem: str, tensor: str | None = None) -> SafetensorsError:
    where = f"{path}: tensor {tensor!r}" if tensor is not None else path
    return SafetensorsError(f"{where}: {problem}")


def numpy_dtype_name(dtype: npt.DTypeLike) -> str:
    """Returns the safetensors dtype name ("F32", "BF16", ...) for a numpy dtype.

    Byte order is ignored, so big-endian arrays map to the same name; the
    writer byte-swaps them to the little-endian layout the format requires.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    try:
        return _NUMPY_TO_DTYPE[dtype]
    except KeyError:
        raise SafetensorsError(f"dtype {dtype} has no safetensors equivalent") from None


def _is_int(value: object) -> bool:
    # JSON true/false decode to bool, which is an int subclass.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file, enough to read it without the others."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # Absolute byte offset in the file.
    nbytes: int


class SafetensorsReader:
    """Reads tensors from a safetensors file one at a time.

    The header is parsed and validated up front, so a truncated or corrupt
    file fails at open time with a message naming the file and tensor rather
    than midway through a long conversion.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._file: BinaryIO = open(self._path, "rb")
        try:
            self._infos, self._metadata = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        path = self._path
        file_size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(_HEADER_LENGTH_BYTES)
        if len(prefix) < _HEADER_LENGTH_BYTES:
            raise _error(path, f"file is {file_size} bytes, too short for a header length")
        (header_size,) = struct.unpack("<Q", prefix)
        data_start = _HEADER_LENGTH_BYTES + header_size
        if data_start > file_size:
            raise _error(path, f"header length {header_size} exceeds file size {file_size}")
        try:
            header = json.loads(self._file.read(header_size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _error(path, f"header is not valid UTF-8 JSON: {e}") from e
        if not isinstance(header, dict):
            raise _error(path, "header is not a JSON object")

        metadata = header.pop(_METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise _error(path, f"{_METADATA_KEY} must map strings to strings")

        infos = [self._parse_entry(name, entry, data_start, file_size) for name, entry in header.items()]
        # File order: sorting by offset makes a names() walk read sequentially.
        infos.sort(key=lambda info: info.offset)
        for prev, cur in zip(infos, infos[1:]):
            if cur.offset < prev.offset + prev.nbytes:
                raise _error(path, f"data overlaps tensor {prev.name!r}", cur.name)
        return {info.name: info for info in infos}, metadata

    def _parse_entry(self, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
        path = self._path
        if not isinstance(entry, dict):
            raise _error(path, "header entry is not a JSON object", name)
        dtype_name = entry.get("dtype")
        if dtype_name not in DTYPE_TO_NUMPY:
            raise _error(path, f"unsupported dtype {dtype_name!r}", name)
        dtype = DTYPE_TO_NUMPY[dtype_name]
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _error(path, f"invalid shape {shape!r}", name)
        offsets = entry.get("data_offsets")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _error(path, f"invalid data_offsets {offsets!r}", name)
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _error(
                path,
                f"data_offsets {offsets} span {end - begin} bytes but shape {shape} of {dtype_name} needs {nbytes}",
                name,
            )
        if data_start + end > file_size:
            raise _error(
                path, f"data ends at byte {data_start + end} past end of file ({file_size} bytes); truncated?", name
            )
        return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=nbytes)

    @property
    def metadata(self) -> dict[str, str]:
        """The free-form `__metadata__` strings (a copy; empty if absent)."""
        return dict(self._metadata)

    def names(self) -> list[str]:
        """Tensor names in the order their data appears in the file."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of `name`, without reading its data."""
        try:
            return self._infos[name]
        except KeyError:
            raise _error(self._path, "no such tensor in file", name) from None

    def read(self, name: str) -> np.ndarray:
        """Reads exactly the bytes of `name` into a freshly allocated array."""
        info = self.info(name)
        array = np.empty(info.shape, dtype=info.dtype)
        self._file.seek(info.offset)
        # BufferedReader.readinto only returns short at end of file.
        read = self._file.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        if read != info.nbytes:
            raise _error(self._path, f"read {read} of {info.nbytes} bytes; file truncated?", name)
        return array

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time.

    The header holds every tensor's offsets, so names, dtypes and shapes are
    declared up front and the data is then streamed in declaration order.
    Bytes go to `path + ".partial"`, which is renamed to `path` only once every
    tensor has been written; an interrupted conversion never leaves a file
    that looks complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tensors: Sequence[tuple[str, npt.DTypeLike, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self._path = os.fspath(path)
        self._partial_path = self._path + ".partial"
        self._specs: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        self._next = 0

        header: dict[str, object] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise _error(self._path, f"{_METADATA_KEY} must map strings to strings")
            header[_METADATA_KEY] = metadata
        offset = 0
        for name, dtype, shape in tensors:
            if not isinstance(name, str) or name == _METADATA_KEY or name in header:
                raise _error(self._path, "tensor name is reserved, duplicated or not a string", name)
            try:
                dtype_name = numpy_dtype_name(dtype)
            except SafetensorsError as e:
                raise _error(self._path, str(e), name) from None
            shape = tuple(shape)
            if not all(_is_int(d) and d >= 0 for d in shape):
                raise _error(self._path, f"invalid shape {shape}", name)
            dtype = DTYPE_TO_NUMPY[dtype_name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._specs.append((name, dtype, shape))
            offset += nbytes

        header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % _HEADER_ALIGNMENT)
        self._file: BinaryIO | None = open(self._partial_path, "wb")
        try:
            self._file.write(struct.pack("<Q", len(header_bytes)))
            self._file.write(header_bytes)
        except BaseException:
            self._discard()
            raise

    def write(self, name: str, array: npt.ArrayLike) -> None:
        """Appends the data of `name`, which must be the next declared tensor."""
        if self._file is None:
            raise _error(self._path, "writer is closed", name)
        if self._next == len(self._specs):
            raise _error(self._path, "every declared tensor has already been written", name)
        expected_name, dtype, shape = self._specs[self._next]
        if name != expected_name:
            declared = any(name == spec[0] for spec in self._specs)
            problem = "out of order" if declared else "not declared"
            raise _error(self._path, f"{problem}; expected {expected_name!r} next", name)
        array = np.asarray(array)
        if array.dtype.newbyteorder("<") != dtype:
            raise _error(self._path, f"dtype {array.dtype} does not match declared {dtype}", name)
        if array.shape != shape:
            raise _error(self._path, f"shape {array.shape} does not match declared {shape}", name)
        # Casting to the little-endian declared dtype byte-swaps big-endian input.
        data = np.ascontiguousarray(array, dtype=dtype)
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        """Publishes the file, or deletes it and raises if tensors are missing."""
        if self._file is None:
            return
        if self._next < len(self._specs):
            missing = [spec[0] for spec in self._specs[self._next :]]
            self._discard()
            raise _error(self._path, f"closed before tensors {missing} were written", missing[0])
        self._file.close()
        self._file = None
        os.replace(self._partial_path, self._path)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.remove(self._partial_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._discard()
        else:
            self.close()
