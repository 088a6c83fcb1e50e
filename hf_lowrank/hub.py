"""Hub IO: resolve local folders or Hub repos, and upload a folder as one commit.

A leaf of the core (huggingface_hub only, imported on first use): the config and the model
read and write through it; the model card (card.py) and PEFT interop (peft_interop.py) live
in their own modules. Snapshots download only JSON, safetensors and Markdown, so nothing
pickled ever reaches the machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.md"]

# -- resolving folders and files --------------------------------------------------------------


def _hub_errors() -> tuple[type[Exception], ...]:
    from huggingface_hub import errors

    return (errors.EntryNotFoundError, errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError)


def check_repo_id(path_or_repo_id: str | os.PathLike) -> str:
    """The argument as a Hub repo id; a string that can only be a local path is reported missing."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(path_or_repo_id)
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{text}: no such folder, and not a Hub repo id either.") from None
    return text


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a snapshot of the Hub repo holding only its JSON, safetensors and .md files.

    ``hub_kwargs`` go to ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``, ``token``, ...).
    """
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    repo_id = check_repo_id(path_or_repo_id)
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS, **hub_kwargs))
    except _hub_errors() as e:
        raise FileNotFoundError(f"{repo_id}: no local folder of that name, and the Hub repo could not be read ({e})") from e


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> Path:
    """``filename`` inside a local folder, or downloaded from the Hub repo (``hub_kwargs`` go to ``hf_hub_download``)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path / filename
    repo_id = check_repo_id(path_or_repo_id)
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **hub_kwargs))
    except _hub_errors() as e:
        raise FileNotFoundError(f"{repo_id}/{filename}: not found on the Hub or in the local cache ({e})") from e


# -- uploading --------------------------------------------------------------------------------


def push_folder(
    repo_id: str,
    write: Callable[[Path], None],
    commit_message: str = "Upload with hf_lowrank",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Write files with ``write(folder)`` into a fresh temporary folder and upload exactly them as one commit.

    Goes through huggingface_hub's standard path (``HfApi.create_repo`` then ``HfApi.upload_folder``)
    and returns ``upload_folder``'s result (the commit info).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"  # a child, so atomic writers can stage siblings inside tmp
        folder.mkdir()
        write(folder)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message,
            revision=revision, create_pr=create_pr,
        )
