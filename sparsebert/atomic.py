"""Files and folders that appear whole or not at all, and the manifest that vouches for them.

A file is written to a temporary sibling and renamed over its name once flushed to disk; a
stage's output folder is built under ``<name>.partial-<pid>`` and renamed into place when the
stage has finished, so a killed stage leaves either the earlier result or a leftover that no
reader takes for a result. ``manifest.json`` lists each file of a folder with its size and
sha256, so a later stage can refuse a folder that changed (or was cut short) since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from sparsebert.errors import UserError

MANIFEST = "manifest.json"
PARTIAL = ".partial-"  # a folder or file still being written, by the process whose id follows
REPLACED = ".replaced-"  # an earlier result, for the instant between the two renames that replace it


class DamagedOutput(UserError):
    pass


# ---------------------------------------------------------------- files


@contextlib.contextmanager
def open_for_writing(path: Path, mode: str = "w", **open_args) -> Iterator:
    """A file object whose content appears under ``path`` only once it was all written."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    try:
        with open(temporary, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with open_for_writing(path, encoding="utf-8") as f:
        f.write(text)


def write_json(path: Path, value, **dumps_args) -> None:
    write_text(path, json.dumps(value, **dumps_args))


def save_figure(figure, path: Path, **savefig_args) -> None:
    with open_for_writing(path, "wb") as f:
        figure.savefig(f, format=Path(path).suffix.lstrip("."), **savefig_args)


# ---------------------------------------------------------------- folders


@contextlib.contextmanager
def building(folder: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to write ``folder``'s new content into; once the block ends
    without an error it takes ``folder``'s place (an earlier result is removed only then), and
    after an error it is removed. Leftovers of killed runs are removed first."""
    folder = Path(folder)
    remove_leftovers(folder)
    partial = folder.with_name(f"{folder.name}{PARTIAL}{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        yield partial
        _put_in_place(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _put_in_place(partial: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(partial, folder)
        return
    replaced = folder.with_name(f"{folder.name}{REPLACED}{os.getpid()}")
    os.replace(folder, replaced)  # a folder cannot be renamed over another that has files in it
    os.replace(partial, folder)
    shutil.rmtree(replaced)


def relocated(value, partial: Path, folder: Path):
    """``value`` (JSON-like) with each path into ``partial`` made to name the same file in
    ``folder``, where it will be once the stage has finished."""
    if isinstance(value, dict):
        return {k: relocated(v, partial, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, partial, folder) for v in value]
    if isinstance(value, str) and (value == str(partial) or value.startswith(f"{partial}{os.sep}")):
        return str(folder) + value[len(str(partial)):]
    return value


def leftovers(folder: Path) -> list[Path]:
    """What killed runs left beside ``folder``: partial new results, or an earlier one set aside."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return []
    return sorted(p for marker in (PARTIAL, REPLACED) for p in folder.parent.glob(f"{folder.name}{marker}*"))


def remove_leftovers(folder: Path) -> None:
    """Remove the leftovers of runs no longer alive (a live one is still writing)."""
    for leftover in leftovers(folder):
        if _alive(leftover.name.rsplit("-", 1)[-1]):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # this process starts a new result: its own earlier try is over
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refuse_leftover_only(folder: Path, rerun: str) -> None:
    """A missing ``folder`` with only a killed run's leftover beside it: say so, not "not found"."""
    found = leftovers(folder)
    if found and not Path(folder).exists():
        raise DamagedOutput(f"{folder} is not there, only {found[0].name}, left by a run that was stopped "
                            f"before it finished; re-run `{rerun}`")


# ---------------------------------------------------------------- manifest


def write_manifest(folder: Path, stage: str) -> Path:
    """``folder/manifest.json``: every file below it (relative path, bytes, sha256), the stage and
    the sparsebert version that wrote them, and when."""
    from sparsebert import __version__

    folder = Path(folder)
    files = [{"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in _listed_files(folder)]
    manifest = {"stage": stage, "sparsebert": __version__,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    path = folder / MANIFEST
    write_json(path, manifest, indent=1)
    return path


def verify(folder: Path) -> None:
    """Refuse ``folder`` when its manifest disagrees with its files, naming the first that does;
    a folder without a manifest (an older run, a user's own model) is taken as it is."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
        entries, stage = manifest["files"], manifest.get("stage", "?")
    except (ValueError, KeyError, TypeError):
        raise DamagedOutput(f"{path} cannot be read; re-run the stage that wrote {folder}") from None
    for entry in entries:
        problem = _mismatch(Path(folder) / entry["path"], entry)
        if problem:
            raise DamagedOutput(f"{Path(folder) / entry['path']} {problem}: it is not what `sparsebert {stage}` "
                                f"wrote ({path}); re-run that stage")


def _mismatch(path: Path, entry: dict) -> str | None:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"has {size} bytes where its manifest says {entry['bytes']}"
    if _sha256(path) != entry["sha256"]:
        return "has changed (its sha256 differs from its manifest's)"
    return None


def _listed_files(folder: Path) -> list[Path]:
    """The files a manifest lists: all but the manifest itself and unfinished temporary files."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and PARTIAL not in p.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
