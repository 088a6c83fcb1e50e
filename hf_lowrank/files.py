"""Atomic writes and safe reads: JSON and safetensors (one file or transformers-style shards), never pickle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .checks import fail, is_int

SIZE_UNITS = ("KB", "MB", "GB", "TB")  # what huggingface_hub's shard splitter parses
# What a saved tokenizer may hold (a merge copies them), and the files any one of which says a folder has one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success fsync it and rename it onto ``path``.

    On an error the temporary file is removed, so a failed write leaves neither a partial
    file under ``path`` nor a stray temporary one.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with _replacing(Path(path)) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, shared storage split) atomically as safetensors."""
    with _replacing(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming the file when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:  # truncated or not safetensors: its message does not name the file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (no tensor is read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def metadata_json(path: str | os.PathLike, metadata: dict[str, str], field: str, default: Any) -> Any:
    """Field ``field`` of a safetensors file's metadata, parsed as JSON; ``default`` when absent."""
    if field not in metadata:
        return default
    try:
        return json.loads(metadata[field])
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: metadata field {field!r} is not valid JSON ({e}): {metadata[field][:80]!r}; "
            "the file was edited or written by another tool, save the model again."
        ) from e


def index_name(weights_name: str) -> str:
    """The index file of a sharded checkpoint, as transformers names it: ``model.safetensors.index.json``."""
    return f"{weights_name}.index.json"


def check_shard_size(field: str, value: Any) -> None:
    """A shard size: an int of bytes >= 1, or a string of a number and a unit (``"5GB"``, ``"500MB"``)."""
    if is_int(value) and value >= 1:
        return
    if isinstance(value, str) and value.strip()[-2:].upper() in SIZE_UNITS:
        try:
            if float(value.strip()[:-2]) > 0:
                return
        except ValueError:
            pass
    fail(field, value, f"give a number of bytes or a size such as '5GB' (units {', '.join(SIZE_UNITS)})")


def write_weights(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    weights_name: str,
    metadata: dict[str, str],
    max_shard_size: int | str,
) -> list[str]:
    """Write ``tensors`` as ``weights_name``, or as shards with an index when they exceed ``max_shard_size``.

    Shards and index are laid out as transformers writes them (``model-00001-of-00002.safetensors``,
    ``model.safetensors.index.json`` with ``metadata.total_size`` and ``weight_map``), split by
    huggingface_hub's ``split_torch_state_dict_into_shards``; every shard carries ``metadata``.
    Returns the names of the files written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = Path(folder)
    stem = weights_name.removesuffix(".safetensors")
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        write_safetensors(folder / filename, {k: tensors[k] for k in keys}, metadata=metadata)
    written = sorted(split.filename_to_tensors)
    if split.is_sharded:
        write_json(folder / index_name(weights_name), {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
        written.append(index_name(weights_name))
    return written


def _inside(folder: Path, path: Path) -> Path:
    """``path``, refused when it is a link leading out of ``folder`` (a Hub snapshot's links into its blobs are fine)."""
    target = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<rev>/file -> ../../blobs/<hash>
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(target == r or r in target.parents for r in roots):
        raise ValueError(f"{path}: a link to {target}, outside the folder; copy the file into the folder instead of linking it.")
    return path


def weight_files(folder: str | os.PathLike, weights_name: str) -> list[Path] | None:
    """The safetensors files of ``weights_name`` in ``folder``: the file itself, or the shards its index lists; None if neither exists.

    A file that is a link leading outside ``folder`` is refused: a folder's files are read, nothing else."""
    folder = Path(folder)
    if (folder / weights_name).is_file():
        return [_inside(folder, folder / weights_name)]
    index = folder / index_name(weights_name)
    if not index.is_file():
        return None
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' of tensor names to shard files; the index is damaged, save the model again.")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
    if outside:
        raise ValueError(f"{index}: weight_map names {outside[:3]}, not safetensors files in the folder itself.")
    return [_inside(folder, folder / s) for s in shards]


def read_weights(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path], dict[Path, dict[str, str]]]:
    """Tensors of one file or of all shards, which file holds each tensor, and each file's metadata."""
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for path in files:
        part = read_safetensors(path)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ValueError(f"{path}: holds {twice[:3]}, which {source[twice[0]].name} holds as well; the shards do not belong together.")
        tensors.update(part)
        source.update(dict.fromkeys(part, path))
        metadata[path] = read_safetensors_metadata(path)
    return tensors, source, metadata


def fingerprint(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: equal exactly when the tensors are bit for bit equal."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


# A file inside every folder hf_lowrank creates as a temporary (the container atomic_directory writes
# new contents in, with the old contents moved aside into it): cleaning up removes only folders that hold it.
TEMP_MARKER = ".hf_lowrank_temporary"
STAGING_PREFIX = ".staging-"  # the container of a shared atomic_directory: ".staging-<name>"
ASIDE_NAME = ".hf_lowrank_replaced"  # inside a container: the old contents of <name>, moved aside for the one rename
# Every temporary this module names: ".staging-<name>" (shared), ".<name>.<8 characters>" (mkdtemp),
# and ".<name>.old<pid>" (an earlier version's moved-aside folder, still recognised when cleaning up).
_LEFTOVER = re.compile(rf"^({re.escape(STAGING_PREFIX)}.+|\..+\.(old\d+|[a-z0-9_]{{8}}))$")
_MOVED_ASIDE = re.compile(r"^\.(.+)\.old\d+$")


def is_marked(folder: Path) -> bool:
    """Whether ``folder`` is a temporary hf_lowrank created (it holds :data:`TEMP_MARKER`)."""
    return folder.is_dir() and not folder.is_symlink() and (folder / TEMP_MARKER).is_file()


def remove_marked(folder: Path) -> None:
    """Remove a marked temporary folder, its marker last (a kill half-way leaves it marked, so it is removed later)."""
    if not is_marked(folder):
        return
    for child in folder.iterdir():
        if child.name == TEMP_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def staging_folder(path: str | os.PathLike) -> Path:
    """Where a shared :func:`atomic_directory` of ``path`` writes: ``.staging-<name>/<name>`` beside it."""
    path = Path(path)
    return path.parent / f"{STAGING_PREFIX}{path.name}" / path.name


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, shared: bool = False, owner: bool = True) -> Iterator[Path]:
    """Yield a folder to write ``path``'s new contents into; on success it replaces ``path`` in one rename.

    The yielded folder is ``<container>/<name>``, the container a marked (:data:`TEMP_MARKER`)
    hidden sibling of ``path``: a fresh ``.<name>.<8 characters>``, or with ``shared=True``
    the fixed ``.staging-<name>`` (:func:`staging_folder`), which every process of a run can
    compute to write its own files into. Only the ``owner`` creates, commits and cleans up;
    others get the path alone. On success the marker records the contents as complete, the old
    ``path`` is moved into the container and the new one renamed onto ``path``. A crash before
    that leaves ``path`` as it was; a kill between the two renames leaves the complete new
    contents in the marked container, which :func:`remove_leftovers` puts in place. Nesting
    works: the container, not the folder written, holds the marker.
    """
    path = Path(path)
    if path.name in (TEMP_MARKER, ASIDE_NAME):
        fail("folder name", path.name, f"{TEMP_MARKER} and {ASIDE_NAME} are hf_lowrank's own temporary names; choose another")
    if not owner:
        yield staging_folder(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        container = staging_folder(path).parent
        remove_marked(container)  # an earlier attempt's (this run holds the folder's lock)
        container.mkdir()
    else:
        container = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    (container / TEMP_MARKER).write_text(f"new contents of {path.name}, pid {os.getpid()}\n")
    new = container / path.name
    new.mkdir()  # follows the umask like any mkdir (mkdtemp's container is 0700)
    complete = False
    try:
        yield new
        write_json(container / TEMP_MARKER, {"complete": path.name})  # from here on it is kept, never deleted
        complete = True
        if path.exists() or path.is_symlink():
            os.replace(path, container / ASIDE_NAME)
        os.replace(new, path)
        complete = False  # in place: the container holds only the old contents now
    finally:
        if not complete:
            remove_marked(container)


def _complete_contents(container: Path) -> str | None:
    """The name a container holds complete new contents for (its marker says so, and they are there), else None."""
    try:
        record = read_json(container / TEMP_MARKER)
    except (FileNotFoundError, ValueError):
        return None
    name = record.get("complete") if isinstance(record, dict) else None
    if isinstance(name, str) and "/" not in name and name not in (".", "..") and (container / name).is_dir():
        return name
    return None


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Clean what a killed :func:`atomic_directory` left in ``folder``; only folders marked as hf_lowrank's are touched.

    A container is removed, except one whose contents were complete when the kill came
    (between moving the old ``<name>`` aside and renaming the new one in): those are put in
    place first. ``.<name>.old<pid>`` (an earlier version's moved-aside folder) without a
    ``<name>`` beside it is the only copy left, so it is renamed back to ``<name>``. A hidden
    folder without the marker inside (``.cache.datasets``, ``.git.previous``) is never touched,
    whatever its name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if not (_LEFTOVER.match(entry.name) and is_marked(entry)):
            continue
        aside = _MOVED_ASIDE.match(entry.name)
        complete = _complete_contents(entry)
        if complete and not (folder / complete).exists():
            os.replace(entry / complete, folder / complete)
        if aside and not (folder / aside.group(1)).exists():
            os.replace(entry, folder / aside.group(1))
            (folder / aside.group(1) / TEMP_MARKER).unlink(missing_ok=True)
        else:
            remove_marked(entry)


LOCK_NAME = ".hf_lowrank.lock"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "output_dir") -> Iterator[Path]:
    """Hold ``folder/.hf_lowrank.lock`` for the block: one training run per folder.

    The lock is an exclusive ``flock`` on that file, which records the holder's pid, host and
    start time. The kernel drops the lock when the holder dies, so a lock left by a killed run
    is stale and taken over; a live holder (any process, this one included) is refused with
    who holds it. The file is removed when the block ends. A folder that cannot be written is
    refused here, before any work.
    """
    import fcntl
    import socket
    import time

    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                try:
                    info = json.loads(holder)
                    who = f"pid {info['pid']} on host {info['host']}, since {info['since']}"
                except (ValueError, KeyError, TypeError):
                    who = f"a process that wrote {holder[:200]!r}"
                raise RuntimeError(
                    f"{what}={str(folder)!r} is in use by another training run ({who}): two runs in one folder would "
                    f"overwrite each other's checkpoints. Wait for it to finish, stop it, or choose another {what}. "
                    f"(The lock is {path}; the system releases it when that process ends.)"
                ) from None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file a finishing holder just unlinked
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as e:
        raise OSError(e.errno, f"{what}={str(folder)!r} cannot be written ({e.strerror or e}); choose a writable folder") from e
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # still locked: nobody can take a lock on it between the two lines
        os.close(fd)
