"""Find a checkpoint directory: a local path, or a Hub id resolved through huggingface_hub's cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointNotFoundError

# What a Janus checkpoint needs; the Hub repos also hold README files and images we skip.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_checkpoint(model: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Return the local directory holding `model`.

    A path that exists is used as is. Otherwise `model` must look like a Hub id (`org/name`); it is
    taken from the huggingface_hub cache, downloading it unless HF_HUB_OFFLINE is set.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(model)
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise CheckpointNotFoundError(f"{name}: no such checkpoint directory (and it is not a Hub id like org/name)")
    return _from_hub(name, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _offline()
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=CHECKPOINT_FILES,
            local_files_only=offline,
        ))
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"{repo_id}: no such model on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        why = "downloads are off (HF_HUB_OFFLINE is set)" if offline else f"the download failed ({exc})"
        raise CheckpointNotFoundError(
            f"{repo_id} is not a local directory, it is not in the Hugging Face cache at {cache}, "
            f"and {why}. Download it first, e.g. `hf download {repo_id}` on a machine with network, "
            f"or pass the path of a local checkpoint directory."
        ) from None
