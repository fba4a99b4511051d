"""What the server checks in an adapter directory before the engine reads it.

- The directory and every entry in it are resolved to their real paths (symlinks followed,
  file symlinks included); with --allowed-lora-dirs, any that leaves those directories is
  refused, so a link inside an allowed directory cannot expose a file elsewhere.
- adapter_config.json must be there (its size, nesting depth and fields are checked when the
  engine parses it: moelora.lora.load_adapter_config).
- Each adapter_model*.safetensors must start like a safetensors file (an 8-byte header length
  that fits the file, then '{'); anything else is refused without echoing its bytes.

Messages name files by their name inside the adapter directory, never by a server path.
"""

from __future__ import annotations

import os
import struct

from moelora.entrypoints.openai.errors import APIError, bad_request, not_found

MAX_ENTRIES = 4096  # a PEFT directory holds a handful of files
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


def check_adapter_dir(path: str, allowed_dirs: list[str] | None) -> str:
    """The real path of the adapter directory at `path`, after the checks above. Raises
    APIError: 403 outside the allowed directories, 404 when there is no adapter, 400 when a
    file is malformed. `allowed_dirs` are real paths; None or empty allows every directory."""
    real = os.path.realpath(path)
    if allowed_dirs and not _within_any(real, allowed_dirs):
        raise APIError(403, "lora_path is outside the allowed LoRA directories", "lora_path")
    if not os.path.isdir(real):
        raise not_found("no PEFT adapter at lora_path (not a directory)", "lora_path")
    config = os.path.join(real, "adapter_config.json")
    if not os.path.isfile(config):
        raise not_found("no PEFT adapter at lora_path (adapter_config.json not found)",
                        "lora_path")
    weights = []
    with os.scandir(real) as entries:
        for count, entry in enumerate(entries):
            if count >= MAX_ENTRIES:
                raise bad_request(f"the adapter directory has more than {MAX_ENTRIES} entries",
                                  "lora_path")
            target = os.path.realpath(entry.path)
            if allowed_dirs and not _within_any(target, allowed_dirs):
                raise APIError(403, f"adapter file '{entry.name}' links outside the allowed "
                                    f"LoRA directories", "lora_path")
            if entry.name.startswith("adapter_model") and entry.name.endswith(".safetensors"):
                weights.append((entry.name, target))
    for name, target in weights:
        _check_safetensors_start(name, target)
    return real


def _check_safetensors_start(name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise bad_request(f"{name} is not a regular file", "lora_path")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        raise bad_request(f"{name} cannot be read", "lora_path") from None
    if len(start) < 9:
        raise bad_request(f"{name} is not a safetensors file (too short)", "lora_path")
    (header_len,) = struct.unpack("<Q", start[:8])
    if header_len > min(MAX_HEADER_BYTES, size - 8) or start[8:9] != b"{":
        raise bad_request(f"{name} is not a safetensors file", "lora_path")


def _within_any(path: str, directories: list[str]) -> bool:
    return any(_is_within(path, d) for d in directories)


def _is_within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:
        return False
