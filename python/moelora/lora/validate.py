"""Registration-time checks that need no weights: the error type, the safetensors header
reader, and the dtype / rank / shape checks.

Registration must fail fast and cheaply: a safetensors file starts with an 8-byte
little-endian header length and a JSON header (name -> dtype, shape, byte offsets), so we read
those bytes only. The weights are read later, by the adapter cache or `load_dense`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# Dtypes the adapter cache converts from; anything else (int8, fp8, f64) is refused at
# registration rather than failing later inside a copy.
SUPPORTED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_ALL_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_JSON_DEPTH = 64  # adapter files nest 3 or 4 levels; a deeper file is corrupt or hostile


class AdapterValidationError(ValueError):
    """An adapter that cannot be served; the message names the adapter and the problem."""

    def __init__(self, adapter: str, problem: str) -> None:
        super().__init__(f"LoRA adapter {adapter!r}: {problem}")
        self.adapter = adapter
        self.problem = problem


def loads_bounded(data: bytes | str, adapter: str, file_name: str):
    """json.loads of an adapter file, refusing (AdapterValidationError naming the file) JSON
    nested deeper than MAX_JSON_DEPTH levels: Python's parser recurses per level and would raise
    RecursionError part way down a 200,000-level file."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise AdapterValidationError(adapter, f"{file_name} nests JSON deeper than "
                                              f"{MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterValidationError(adapter, f"cannot parse {file_name}: {e}") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise AdapterValidationError(adapter, f"{file_name} nests JSON deeper than "
                                              f"{MAX_JSON_DEPTH} levels")
    return value


def _depth_exceeds(value, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (dict, list)))
    return False


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header. `data_start` is the byte offset of its
    first element from the start of the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_start: int


def read_header_bytes(path: str | Path, adapter: str) -> tuple[bytes, int]:
    """(the JSON header of a safetensors file, the file's size), reading no weight."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise AdapterValidationError(adapter, f"{path.name} is not a safetensors file")
            (header_len,) = struct.unpack("<Q", size_bytes)
            if header_len > _MAX_HEADER_BYTES:
                raise AdapterValidationError(
                    adapter, f"{path.name}: header length {header_len} is implausible"
                )
            raw = f.read(header_len)
        file_size = path.stat().st_size
    except OSError as e:
        raise AdapterValidationError(adapter, f"cannot read {path.name}: {e.strerror}") from None
    if len(raw) != header_len:
        raise AdapterValidationError(adapter, f"{path.name}: truncated header")
    return raw, file_size


def read_safetensors_header(path: str | Path, adapter: str) -> dict[str, TensorHeader]:
    """Parse a safetensors header (8-byte length + JSON) without reading any weight."""
    path = Path(path)
    raw, file_size = read_header_bytes(path, adapter)
    header_len = len(raw)
    entries = loads_bounded(raw, adapter, f"{path.name} (header)")
    if not isinstance(entries, dict):
        raise AdapterValidationError(adapter, f"{path.name}: header is not a JSON object")
    data_base = 8 + header_len
    tensors: dict[str, TensorHeader] = {}
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterValidationError(
                adapter, f"{path.name}: malformed header entry for tensor {name!r}"
            ) from e
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * _ALL_DTYPE_SIZES.get(dtype, 0)
        if dtype in _ALL_DTYPE_SIZES and (end - begin != expected or data_base + end > file_size):
            raise AdapterValidationError(
                adapter,
                f"{path.name}: tensor {name!r} data range does not match its shape "
                f"{list(shape)} (file truncated or corrupt)",
            )
        tensors[name] = TensorHeader(name, dtype, shape, data_base + begin)
    return tensors


def check_dtype(adapter: str, tensor: TensorHeader) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise AdapterValidationError(
            adapter,
            f"tensor {tensor.name!r} has unsupported dtype {tensor.dtype} "
            f"(supported: {', '.join(SUPPORTED_DTYPES)})",
        )


def check_shape(adapter: str, tensor: TensorHeader, expected: tuple[int, ...], what: str) -> None:
    """`what` says which model dimension the expectation came from, so the message tells the
    user whether the adapter was trained for another model."""
    if tensor.shape != expected:
        raise AdapterValidationError(
            adapter,
            f"tensor {tensor.name!r} has shape {list(tensor.shape)}, expected "
            f"{list(expected)} for {what}",
        )


def check_rank(adapter: str, rank: int, max_lora_rank: int | None, where: str) -> None:
    if rank < 1:
        raise AdapterValidationError(adapter, f"rank {rank} at {where} must be >= 1")
    if max_lora_rank is not None and rank > max_lora_rank:
        raise AdapterValidationError(
            adapter, f"rank {rank} at {where} exceeds max_lora_rank={max_lora_rank}"
        )
