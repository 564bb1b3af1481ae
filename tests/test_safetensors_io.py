"""Tests for the streaming safetensors reader/writer against the reference library."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from medllama_jax.convert.safetensors_io import (
    DTYPE_TO_NUMPY,
    SafetensorsError,
    SafetensorsReader,
    SafetensorsWriter,
    numpy_dtype_name,
)


def _numpy_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, (2, 3), dtype=np.int64),
        "i32": rng.integers(-(2**31), 2**31 - 1, (5,), dtype=np.int32),
        "i16": rng.integers(-(2**15), 2**15 - 1, (3, 1, 2), dtype=np.int16),
        "i8": rng.integers(-128, 127, (9,), dtype=np.int8),
        "u8": rng.integers(0, 255, (2, 2), dtype=np.uint8),
        "bool": rng.integers(0, 2, (6,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def _assert_names(excinfo: pytest.ExceptionInfo, path: os.PathLike, tensor: str | None = None) -> None:
    message = str(excinfo.value)
    assert os.fspath(path) in message
    if tensor is not None:
        assert repr(tensor) in message


def _write_raw(path: os.PathLike, header: object, data: bytes = b"") -> None:
    header_bytes = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


# Reading files produced by the reference library.


def test_reads_numpy_save_file_bit_exactly(tmp_path):
    path = tmp_path / "ref.safetensors"
    tensors = _numpy_tensors()
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np", "note": "héllo"})
    with SafetensorsReader(path) as reader:
        assert sorted(reader.names()) == sorted(tensors)
        assert reader.metadata == {"format": "np", "note": "héllo"}
        for name, expected in tensors.items():
            _assert_bit_exact(reader.read(name), expected)
            info = reader.info(name)
            assert (info.dtype, info.shape, info.nbytes) == (expected.dtype, expected.shape, expected.nbytes)


def test_reads_torch_bfloat16_bit_exactly(tmp_path):
    path = tmp_path / "ref.safetensors"
    tensors = {
        "w": torch.randn(8, 3, dtype=torch.bfloat16),
        "b": torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=torch.bfloat16),
    }
    safetensors.torch.save_file(tensors, path)
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {}
        for name, expected in tensors.items():
            actual = reader.read(name)
            assert actual.dtype == ml_dtypes.bfloat16
            assert actual.shape == tuple(expected.shape)
            np.testing.assert_array_equal(actual.view(np.int16), expected.view(torch.int16).numpy())


def test_names_follow_data_order_in_file(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(_numpy_tensors(), path)
    with SafetensorsReader(path) as reader:
        offsets = [reader.info(name).offset for name in reader.names()]
    assert offsets == sorted(offsets)


def test_reader_context_manager_closes_file(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, path)
    with SafetensorsReader(path) as reader:
        pass
    with pytest.raises(ValueError):
        reader.read("x")


# Files produced by SafetensorsWriter, loaded by the reference library.


def _write_with_writer(path: os.PathLike, tensors: dict[str, np.ndarray], metadata=None) -> None:
    specs = [(name, array.dtype, array.shape) for name, array in tensors.items()]
    with SafetensorsWriter(path, specs, metadata=metadata) as writer:
        for name, array in tensors.items():
            writer.write(name, array)


def test_writer_output_loads_in_reference_library(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = _numpy_tensors()
    tensors["bf16"] = np.array([[1.5, -2.25], [np.nan, np.inf]], dtype=ml_dtypes.bfloat16)
    metadata = {"format": "pt", "source": "medllama"}
    _write_with_writer(path, tensors, metadata)
    assert not os.path.exists(f"{path}.partial")

    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata
        assert set(f.keys()) == set(tensors)
    loaded = safetensors.torch.load_file(path)
    for name, expected in tensors.items():
        actual = loaded[name]
        assert tuple(actual.shape) == expected.shape
        if expected.dtype == ml_dtypes.bfloat16:
            assert actual.dtype == torch.bfloat16
            np.testing.assert_array_equal(actual.view(torch.int16).numpy(), expected.view(np.int16))
        else:
            _assert_bit_exact(actual.numpy(), expected)


def test_writer_round_trips_through_reader_and_pads_header(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = {"a": np.arange(5, dtype=np.int8), "b": np.arange(3, dtype=np.float32)}
    _write_with_writer(path, tensors, {"k": "v"})
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    assert header_size % 8 == 0
    with SafetensorsReader(path) as reader:
        assert reader.names() == ["a", "b"]
        assert reader.metadata == {"k": "v"}
        for name, expected in tensors.items():
            _assert_bit_exact(reader.read(name), expected)


def test_writer_byteswaps_big_endian_input(tmp_path):
    path = tmp_path / "out.safetensors"
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    with SafetensorsWriter(path, [("x", np.float32, (2, 3))]) as writer:
        writer.write("x", big_endian)
    np.testing.assert_array_equal(safetensors.numpy.load_file(path)["x"], big_endian)


def test_dtype_names():
    for name, dtype in DTYPE_TO_NUMPY.items():
        assert numpy_dtype_name(dtype) == name
    assert numpy_dtype_name(ml_dtypes.bfloat16) == "BF16"
    assert numpy_dtype_name(">i4") == "I32"
    with pytest.raises(SafetensorsError):
        numpy_dtype_name(np.complex64)


# Reader errors.


def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    safetensors.numpy.save_file({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, path)
    with SafetensorsReader(path) as reader:
        last = reader.names()[-1]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SafetensorsError, match="past end of file") as excinfo:
        SafetensorsReader(path)
    _assert_names(excinfo, path, last)


def test_corrupt_header(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe garbage \x00\x01\x02" + b"\x00" * 32)
    with pytest.raises(SafetensorsError, match="JSON") as excinfo:
        SafetensorsReader(path)
    _assert_names(excinfo, path)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    with pytest.raises(SafetensorsError, match="exceeds file size") as excinfo:
        SafetensorsReader(path)
    _assert_names(excinfo, path)


def test_unknown_dtype(tmp_path):
    path = tmp_path / "dtype.safetensors"
    _write_raw(path, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8)
    with pytest.raises(SafetensorsError, match="unsupported dtype") as excinfo:
        SafetensorsReader(path)
    _assert_names(excinfo, path, "w")


def test_offsets_inconsistent_with_shape(tmp_path):
    path = tmp_path / "size.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 12)
    with pytest.raises(SafetensorsError, match="needs 12") as excinfo:
        SafetensorsReader(path)
    _assert_names(excinfo, path, "w")


def test_overlapping_offsets(tmp_path):
    path = tmp_path / "overlap.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _write_raw(path, header, b"\x00" * 12)
    with pytest.raises(SafetensorsError, match="overlaps") as excinfo:
        SafetensorsReader(path)
    _assert_names(excinfo, path, "b")


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, path)
    with SafetensorsReader(path) as reader, pytest.raises(SafetensorsError, match="no such tensor") as excinfo:
        reader.read("missing")
    _assert_names(excinfo, path, "missing")


# Writer errors: each must leave neither the final file nor the partial file.


def _assert_no_output(path: os.PathLike) -> None:
    assert not os.path.exists(path)
    assert not os.path.exists(f"{path}.partial")


_SPECS = [("a", np.float32, (2, 3)), ("b", ml_dtypes.bfloat16, (4,))]


@pytest.mark.parametrize(
    "name, array, match",
    [
        ("a", np.zeros((3, 2), np.float32), "shape"),
        ("a", np.zeros((2, 3), np.float64), "dtype"),
        ("b", np.zeros((4,), ml_dtypes.bfloat16), "out of order"),
        ("c", np.zeros((1,), np.float32), "not declared"),
    ],
)
def test_writer_rejects_mismatched_tensor(tmp_path, name, array, match):
    path = tmp_path / "out.safetensors"
    with pytest.raises(SafetensorsError, match=match) as excinfo:
        with SafetensorsWriter(path, _SPECS) as writer:
            writer.write(name, array)
    _assert_names(excinfo, path, name)
    _assert_no_output(path)


def test_writer_missing_tensor_at_close(tmp_path):
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, _SPECS)
    writer.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(SafetensorsError, match="before tensors") as excinfo:
        writer.close()
    _assert_names(excinfo, path, "b")
    _assert_no_output(path)


def test_exception_inside_with_removes_partial_file(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, _SPECS) as writer:
            writer.write("a", np.zeros((2, 3), np.float32))
            assert os.path.exists(f"{path}.partial")
            assert not os.path.exists(path)
            raise RuntimeError("boom")
    _assert_no_output(path)
