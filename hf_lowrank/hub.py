"""Hub plumbing: resolve local folders or Hub repos, and upload folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a snapshot of the Hub repo (safetensors and JSON files only)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo_id), allow_patterns=["*.json", "*.safetensors", "*.md"], **hub_kwargs))


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> Path:
    """``filename`` inside a local folder, or downloaded from the Hub repo."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path / filename
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(path_or_repo_id), filename, **hub_kwargs))


def push_folder(repo_id: str, write: Callable[[Path], None], commit_message: str = "Upload with hf_lowrank", private: bool | None = None, token: str | None = None):
    """Write files with ``write(folder)`` into a temporary folder and upload it as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)


def push_model(model, repo_id: str, **kwargs: Any):
    """Save ``model`` trimmed and upload it."""
    return push_folder(repo_id, model.save_pretrained, **kwargs)
