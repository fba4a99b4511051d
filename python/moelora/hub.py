"""Model names as vLLM takes them: a local directory, `synthetic:<preset>`, or a Hugging Face
repository id resolved through huggingface_hub (the local cache first; a download only where the
network and HF_HUB_OFFLINE allow), so `moelora serve Qwen/Qwen3-30B-A3B` works like `vllm serve`.
"""

from __future__ import annotations

import os
import re

# What a checkpoint directory needs here: config, weights, tokenizer, chat template. PyTorch
# .bin / .pt files are never fetched (pickles are never loaded).
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face repository id ("org/name" or "name")."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_model(name: str, revision: str | None = None) -> str:
    """The local directory that holds model `name` (see the module doc). Raises ValueError naming
    what was tried when it is neither a directory, a synthetic preset nor a resolvable id."""
    if name.startswith("synthetic:") or os.path.isdir(name):
        return name
    if not is_repo_id(name):
        raise ValueError(f"model {name!r}: no such directory (and not a Hugging Face repository "
                         f"id)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise ValueError(f"model {name!r} is not a local directory, and resolving Hugging Face "
                         f"ids needs huggingface_hub: pip install huggingface_hub") from exc
    # HF_HUB_CACHE as it is now (huggingface_hub reads it once, when first imported)
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        # The cache first: an id already downloaded never touches the network.
        return snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS,
                                 cache_dir=cache_dir, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS,
                                 cache_dir=cache_dir)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"model {name!r}: not a local directory, not in the Hugging Face cache "
                         f"({os.environ.get('HF_HUB_CACHE') or 'the default cache'}), and the "
                         f"download failed: {reason}") from exc


__all__ = ["CHECKPOINT_PATTERNS", "is_repo_id", "resolve_model"]
