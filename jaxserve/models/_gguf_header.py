"""Bounded parsing of a GGUF file's header: the metadata key/values and the tensor table.

Layout (little-endian), as written by llama.cpp:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count     x  key: string | value_type u32 | value
    tensor_count x  name: string | n_dims u32 | ne: u64[n_dims] | ggml_type u32 | offset u64
    padding up to `general.alignment` (default 32) | tensor data, tensor i at data_start + offset_i

A string is a u64 byte length and UTF-8 bytes; an array is an element type u32, a u64 count and the
elements. Every count and length is checked against the bytes left in the file *before* anything is
read or allocated, so a header claiming 2**60 tensors or a 2**60-byte string fails at once with a
`CheckpointError` saying what is wrong, instead of exhausting memory. Tensor data is not read here.
"""

import dataclasses
import math
import os
import pathlib
import struct
from typing import BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from jaxserve.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# Fewest bytes a kv entry (8-byte key length, type, 1-byte value) and a tensor entry (name length,
# n_dims, type, offset) can take: bounds the counts before the loops run.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed): a weight reads [out, in]
    offset: int  # absolute byte offset of the data in the file
    num_bytes: int


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFHeader:
    version: int
    metadata: dict[str, object]  # every key/value, decoded to str, int, float, bool or lists
    tensors: dict[str, TensorInfo]  # in file order
    file_size: int


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate the header of the GGUF file at `path`; CheckpointError if unusable."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a regular file")
    with open(path, "rb") as f:
        return _HeaderParser(f, path, path.stat().st_size).parse()


class _HeaderParser:
    def __init__(self, f: BinaryIO, path: pathlib.Path, size: int):
        self._f, self._path, self._size, self._pos = f, path, size, 0

    def _fail(self, problem: str) -> CheckpointError:
        return CheckpointError(self._path, problem)

    def _remaining(self) -> int:
        return self._size - self._pos

    def _take(self, n: int, what: str) -> bytes:
        if n > self._remaining():
            raise self._fail(
                f"truncated header: {what} at byte {self._pos} needs {n} bytes, but the file "
                f"ends at byte {self._size}")
        data = self._f.read(n)
        self._pos += n
        return data

    def _scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        start = self._pos
        length = self._scalar("<Q", f"length of {what}")
        if length > self._remaining():
            raise self._fail(
                f"corrupt or truncated header: {what} at byte {start} claims {length} bytes, past "
                f"the end of the file ({self._remaining()} bytes remain)")
        raw = self._take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"corrupt header: {what} at byte {start} is not UTF-8 ({e.reason})")

    def parse(self) -> GGUFHeader:
        magic = self._f.read(4)
        if len(magic) < 4 and magic and GGUF_MAGIC.startswith(magic):
            raise self._fail(f"truncated file: it is only {self._size} bytes long")
        if magic != GGUF_MAGIC:
            raise self._fail(
                f"not a GGUF file: it starts with {magic!r}, a GGUF file starts with "
                f"{GGUF_MAGIC!r}")
        self._pos = 4
        version = self._scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian GGUF file?)" if version & 0xFFFF == 0 else ""
            raise self._fail(f"unsupported GGUF version {version}{hint}; jaxserve reads versions "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        tensor_count = self._scalar("<Q", "tensor count")
        kv_count = self._scalar("<Q", "metadata count")
        if tensor_count * _MIN_TENSOR_BYTES + kv_count * _MIN_KV_BYTES > self._remaining():
            raise self._fail(
                f"corrupt or truncated header: it claims {tensor_count} tensors and {kv_count} "
                f"metadata entries, which cannot fit in the {self._remaining()} bytes left")

        metadata: dict[str, object] = {}
        for i in range(kv_count):
            key = self._string(f"metadata key #{i}")
            if key in metadata:
                raise self._fail(f"corrupt header: metadata key {key!r} appears twice")
            metadata[key] = self._value(self._value_type(key), key)
        alignment = self._alignment(metadata)

        infos = [self._tensor_info(i, alignment) for i in range(tensor_count)]
        data_start = -(-self._pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, shape, offset, num_bytes in infos:
            if name in tensors:
                raise self._fail(f"corrupt header: tensor {name!r} appears twice")
            start = data_start + offset
            if start + num_bytes > self._size:
                raise self._fail(
                    f"truncated file: tensor {name!r} ({ggml_type.name}, shape {list(shape)}) "
                    f"occupies bytes {start}..{start + num_bytes}, but the file ends at byte "
                    f"{self._size}")
            tensors[name] = TensorInfo(name, ggml_type, shape, start, num_bytes)
        return GGUFHeader(version, metadata, tensors, self._size)

    def _value_type(self, key: str) -> GGUFValueType:
        raw = self._scalar("<I", f"value type of {key!r}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._fail(f"corrupt header: metadata {key!r} has unknown value type {raw} "
                             f"(GGUF value types are 0..{max(GGUFValueType)})") from None

    def _value(self, value_type: GGUFValueType, key: str) -> object:
        if value_type == GGUFValueType.STRING:
            return self._string(f"value of {key!r}")
        if value_type in _SCALAR_FORMATS:
            value = self._scalar(_SCALAR_FORMATS[value_type], f"value of {key!r}")
            # float32 metadata (rms eps, rope base) reads back as its shortest decimal: 1e-05, not
            # 9.999999747378752e-06, so configs rebuilt from it compare equal to the originals.
            return float(str(np.float32(value))) if value_type == GGUFValueType.FLOAT32 else value
        # An array: element type, count, elements.
        element_type = self._value_type(f"{key}[]")
        start = self._pos
        count = self._scalar("<Q", f"length of array {key!r}")
        if element_type in _SCALAR_FORMATS:
            min_size = struct.calcsize(_SCALAR_FORMATS[element_type])
        else:  # a string is at least its length, an array its type and count
            min_size = 8 if element_type == GGUFValueType.STRING else 12
        if count * min_size > self._remaining():
            raise self._fail(
                f"corrupt or truncated header: array {key!r} at byte {start} claims {count} "
                f"elements, past the end of the file ({self._remaining()} bytes remain)")
        if element_type in _SCALAR_FORMATS:
            dtype = np.dtype(_SCALAR_FORMATS[element_type])
            raw = self._take(count * dtype.itemsize, f"array {key!r}")
            return np.frombuffer(raw, dtype).tolist()
        return [self._value(element_type, f"{key}[{j}]") for j in range(count)]

    def _alignment(self, metadata: dict[str, object]) -> int:
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"corrupt header: general.alignment is {alignment!r}, it must be a "
                             f"positive power of two")
        return alignment

    def _tensor_info(self, i: int, alignment: int):
        name = self._string(f"name of tensor #{i}")
        n_dims = self._scalar("<I", f"rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"corrupt header: tensor {name!r} has {n_dims} dimensions "
                             f"(GGUF allows 1..{MAX_DIMS})")
        ne = struct.unpack(f"<{n_dims}Q", self._take(8 * n_dims, f"shape of tensor {name!r}"))
        raw_type = self._scalar("<I", f"type of tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self._fail(f"corrupt header: tensor {name!r} has unknown ggml type "
                             f"{raw_type}") from None
        offset = self._scalar("<Q", f"offset of tensor {name!r}")
        if offset % alignment:
            raise self._fail(f"corrupt header: tensor {name!r} data offset {offset} is not a "
                             f"multiple of the alignment {alignment}")
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if ne[0] % block_size:
            raise self._fail(f"corrupt header: tensor {name!r} rows of {ne[0]} elements are not a "
                             f"whole number of {ggml_type.name} blocks of {block_size}")
        num_bytes = math.prod(ne) // block_size * type_size
        return name, ggml_type, tuple(reversed(ne)), offset, num_bytes
