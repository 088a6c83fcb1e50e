"""Hub IO: resolve local folders or Hub repos, and upload a folder as one commit.

A leaf of the core (huggingface_hub, imported on first use, and checks.py): the config and
the model read and write through it; the model card (card.py) and PEFT interop
(peft_interop.py) live in their own modules. Snapshots download only JSON, safetensors and
Markdown, so nothing pickled ever reaches the machine. Loaders take the Hub keyword arguments
in :data:`HUB_KWARGS` and refuse any other by name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .checks import fail

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.md"]
# The keyword arguments every loader passes on to huggingface_hub; anything else is refused by name.
HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "subfolder")

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


def check_hub_kwargs(where: str, hub_kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments that are not :data:`HUB_KWARGS`, naming them (a typo must not pass silently)."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        fail(f"{where} keyword argument(s)", unknown, f"besides its own arguments it takes only the Hub arguments {', '.join(HUB_KWARGS)}")


def resolve_folder(path_or_repo_id: str | os.PathLike, where: str = "resolve_folder", **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a snapshot of the Hub repo holding only its JSON, safetensors and .md files.

    ``hub_kwargs`` are :data:`HUB_KWARGS` (``where`` names the caller when another one is
    refused); they go to ``huggingface_hub.snapshot_download``, except ``subfolder``, which
    selects a folder inside the local folder or the repo.
    """
    check_hub_kwargs(where, hub_kwargs)
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    path = Path(path_or_repo_id)
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            raise FileNotFoundError(f"{path / subfolder}: no such folder (subfolder={subfolder!r}).")
        return path / subfolder
    repo_id = check_repo_id(path_or_repo_id)
    import huggingface_hub

    patterns = [f"{subfolder}/{p}" for p in SNAPSHOT_PATTERNS] if subfolder else SNAPSHOT_PATTERNS
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs)) / subfolder
    except _hub_errors() as e:
        raise FileNotFoundError(f"{repo_id}: no local folder of that name, and the Hub repo could not be read ({e})") from e


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, where: str = "resolve_file", **hub_kwargs: Any) -> Path:
    """``filename`` inside a local folder, or downloaded from the Hub repo.

    ``hub_kwargs`` are :data:`HUB_KWARGS` and go to ``huggingface_hub.hf_hub_download``
    (``where`` names the caller when another one is refused).
    """
    check_hub_kwargs(where, hub_kwargs)
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path / (hub_kwargs.get("subfolder") or "") / filename
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
