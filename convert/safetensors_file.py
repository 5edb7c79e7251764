"""The safetensors format, read and written with numpy alone (no torch): a little-endian u64
header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
tensors. Both directions go one tensor at a time, so a shard is never held twice."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.errors import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of `path`, by name (as `safetensors.safe_open` lists them),
    each read when reached."""
    if not path.is_file():
        raise ConversionError(path, "file not found")

    def corrupt(problem: str) -> ConversionError:
        return ConversionError(
            path, f"cannot read safetensors file (truncated or corrupt?): {problem}"
        )

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("no header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise corrupt(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise corrupt(f"invalid header: {e}") from None
        if not isinstance(header, dict):
            raise corrupt("the header is not a JSON object")
        header.pop("__metadata__", None)
        start = 8 + n
        for name, info in sorted(header.items()):
            dtype, shape, (begin, end) = _entry(name, info, corrupt)
            if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
                raise corrupt(f"tensor {name!r} does not fit its bytes")
            f.seek(start + begin)
            a = np.fromfile(f, dtype, math.prod(shape))
            yield name, a.reshape(shape)


def _offsets(info) -> tuple[int, int]:
    try:
        begin, end = info["data_offsets"]
        return int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        return (-1, -1)


def _entry(name: str, info, corrupt) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        what = info.get("dtype") if isinstance(info, dict) else info
        raise corrupt(f"tensor {name!r} has an unknown dtype {what!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise corrupt(f"tensor {name!r} has no valid shape")
    begin, end = _offsets(info)
    if not 0 <= begin <= end:
        raise corrupt(f"tensor {name!r} has no valid byte range")
    return DTYPES[info["dtype"]], tuple(shape), (begin, end)


def write(
    path: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.save_file` takes a whole file's tensors as contiguous torch tensors at once,
    a second copy of the shard; this writes them one at a time."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, a in tensors:
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
