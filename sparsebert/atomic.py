"""Files and folders that appear whole or not at all, and the manifest that vouches for them.

A file is written to a temporary sibling and renamed over its name once flushed to disk; a
stage's output folder is built under ``<name>.partial-<pid>`` and renamed into place when the
stage has finished, so a killed stage leaves either the earlier result or a leftover that no
reader takes for a result. ``manifest.json`` lists each file of a folder with its size and
sha256, so a later stage can refuse a folder that changed (or was cut short) since.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from sparsebert.errors import UserError

MANIFEST = "manifest.json"
PARTIAL = ".partial-"  # a folder or file still being written, by the process whose id follows
REPLACED = ".replaced-"  # an earlier result, for the instant between the two renames that replace it
LOCK = ".sparsebert-building"  # in a partial folder: locked by the run building it for as long as it runs


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


class OutputRefused(UserError):
    pass


def destination(folder: Path) -> Path:
    """``folder`` as a place a stage can build beside and rename onto. A symbolic link is followed
    (the new result is built beside its target, and the link keeps naming it); refused: the root, a
    mount point (no rename replaces one) and the folder this process runs in or one holding it
    (replacing it would pull the working folder from under the process)."""
    folder = Path(folder)
    if folder.is_symlink() or folder.name in ("", ".", ".."):
        folder = folder.resolve()
    if not folder.name:
        raise OutputRefused(f"{folder} cannot be an output folder; give a folder inside it")
    if os.path.ismount(folder):
        raise OutputRefused(f"{folder} is a mount point, which a finished result cannot be renamed onto; "
                            "give a folder inside it")
    here = Path.cwd().resolve()
    if folder.resolve() == here or folder.resolve() in here.parents:
        raise OutputRefused(f"{folder} holds the folder this command runs in, which replacing it would remove; "
                            "give another folder, or run from outside it")
    return folder


def holds_result(folder: Path) -> bool:
    return Path(folder).is_dir() and any(Path(folder).iterdir())


def refuse_taken(folder: Path, overwrite: bool) -> Path:
    """``destination(folder)``, refused when it holds a result, unless ``overwrite``. An earlier
    result a run stopped between its two renames left set aside is put back first."""
    folder = destination(folder)
    restore_replaced(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputRefused(f"{folder} is a file, not a folder")
    if holds_result(folder) and not overwrite:
        raise OutputRefused(f"{folder} already holds a result; pass --overwrite or choose another --out")
    return folder


@contextlib.contextmanager
def building(folder: Path, overwrite: bool = False, keep_on_error: bool = False, in_use=(),
             resume: bool = False, kept_for: str | None = None) -> Iterator[Path]:
    """Yield an empty sibling folder to write ``folder``'s new content into; once the block ends
    without an error it takes ``folder``'s place (an earlier result, only with ``overwrite``, is
    removed only then). After an error it is removed, or with ``keep_on_error`` kept and named (what
    it holds may be worth reusing). Leftovers of runs that were stopped are removed first, but not
    one holding a path of ``in_use`` (files this run reads). With ``resume``, the newest such
    leftover is yielded instead, as the stopped run left it, to go on with. ``kept_for`` says what
    a kept folder is for (default: that the next run removes it)."""
    folder = refuse_taken(folder, overwrite)
    if resume:
        partial, lock = _stopped_partial(folder)
    else:
        remove_leftovers(folder, in_use)
        partial, lock = _new_partial(folder)
    try:
        try:
            yield partial
        except BaseException as error:
            if keep_on_error:
                add_note(error, f"what it wrote is kept in {partial} "
                                f"({kept_for or f'the next run writing {folder.name} removes it'})")
            else:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            _put_in_place(partial, folder, overwrite)
        except OutputRefused:  # it names the partial itself
            raise
        except BaseException:
            print(f"[sparsebert] the finished result could not be put in place; it is kept in {partial}",
                  file=sys.stderr, flush=True)
            raise
    finally:
        os.close(lock)


def add_note(error: BaseException, note: str) -> None:
    """Tell the user ``note`` about ``error``: within its one line for a ``UserError`` (the CLI
    prints just that line), else on a line of its own before the traceback."""
    if isinstance(error, UserError):
        error.args = (f"{error}; {note}",)
    else:
        print(f"[sparsebert] stopped before it finished; {note}", file=sys.stderr, flush=True)


def _new_partial(folder: Path) -> tuple[Path, int]:
    """A new, empty ``<folder>.partial-<id>``, locked by this process while it builds; the id is
    this process's, unless a run elsewhere (another container or host) holds that name."""
    for ident in (os.getpid(), *random.sample(range(10**6, 10**9), 8)):
        partial = folder.with_name(f"{folder.name}{PARTIAL}{ident}")
        try:
            partial.mkdir(parents=True)
        except FileExistsError:
            continue
        lock = _try_lock(partial)
        if lock is None:
            raise OutputRefused(f"{partial} was taken over by another run as it was made; try again")
        return partial, lock
    raise OutputRefused(f"no free {folder.name}{PARTIAL}<id> name beside {folder}; remove the leftovers there")


def _stopped_partial(folder: Path) -> tuple[Path, int]:
    """The newest partial result beside ``folder`` that no live run holds, locked by this process."""
    for partial in sorted(leftovers(folder, [PARTIAL]), key=lambda p: p.stat().st_mtime, reverse=True):
        lock = _try_lock(partial)
        if lock is not None:
            return partial, lock
    raise OutputRefused(f"nothing to resume: no run stopped before it finished left a "
                        f"{folder.name}{PARTIAL}<id> folder beside {folder} (or its run is still going)")


def _try_lock(partial: Path) -> int | None:
    """An open descriptor holding ``partial``'s lock, or None while another process holds it. A
    lock, not the process id in the name, says whether a run is alive: ids repeat across
    containers sharing a volume (each has its pid 1) and across hosts, and a lock dies with its holder."""
    try:
        lock = os.open(partial / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # gone meanwhile, or another user's
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None
    return lock


def _put_in_place(partial: Path, folder: Path, overwrite: bool) -> None:
    """Rename ``partial`` to ``folder``. Without ``overwrite``, a result another run put there
    meanwhile is refused (the new one is kept in ``partial``, and named); with it, the earlier
    result is set aside, and put back should the second rename fail."""
    taken = OutputRefused(f"{folder} now holds a result another run put there while this one ran; this run's "
                          f"result is kept in {partial} (rename it, or re-run with --overwrite)")
    if not holds_result(folder):
        try:
            os.replace(partial, folder)  # onto nothing, or an empty folder
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise taken from None
            raise
    elif not overwrite:
        raise taken
    else:
        replaced = folder.with_name(f"{folder.name}{REPLACED}{partial.name.rsplit('-', 1)[1]}")
        os.replace(folder, replaced)  # a folder cannot be renamed over one that has files in it
        try:
            os.replace(partial, folder)
        except BaseException:
            os.replace(replaced, folder)  # the earlier result back where it was
            raise
        _remove_replaced(replaced)
    (folder / LOCK).unlink(missing_ok=True)


def _remove_replaced(replaced: Path) -> None:
    """Best effort: the new result is in place, so a failing cleanup must not fail the stage."""
    shutil.rmtree(replaced, ignore_errors=True)
    if replaced.exists():
        print(f"[sparsebert] could not remove all of {replaced}, the result just replaced; delete it yourself",
              file=sys.stderr, flush=True)


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


def leftovers(folder: Path, markers=(PARTIAL, REPLACED)) -> list[Path]:
    """The folders stopped runs left beside ``folder``: partial new results (``PARTIAL``), or an
    earlier result set aside between two renames (``REPLACED``). Matched by name, not glob, so
    that ``run[1]`` or a sibling ``x.partial-data`` is read as written."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return []
    names = re.compile("|".join(re.escape(folder.name + marker) + r"\d+" for marker in markers))
    return sorted(folder.parent / name for name in os.listdir(folder.parent)
                  if names.fullmatch(name) and (folder.parent / name).is_dir())


def remove_leftovers(folder: Path, in_use=()) -> None:
    """Remove, saying so, the partial results beside ``folder`` whose lock can be taken (no run is
    still building them), but not one holding a path of ``in_use``. An earlier result set aside
    (``REPLACED``) is never removed: only named."""
    for partial in leftovers(folder, [PARTIAL]):
        if any(_inside(Path(path), partial) for path in in_use if path):
            print(f"[sparsebert] keeping {partial}: this run reads from it", flush=True)
            continue
        lock = _try_lock(partial)
        if lock is None:
            continue  # a run is still building it
        try:
            print(f"[sparsebert] removing {partial}, left by a run stopped before it finished", flush=True)
            shutil.rmtree(partial, ignore_errors=True)
        finally:
            os.close(lock)
    for replaced in leftovers(folder, [REPLACED]):
        print(f"[sparsebert] {replaced} holds a result set aside by a run stopped while replacing it; "
              "delete it once you no longer need it", flush=True)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def restore_replaced(folder: Path) -> None:
    """Put back the earlier result that a run stopped between its two renames left set aside as
    ``<folder>.replaced-<id>`` while ``folder`` is missing (unless that run is alive, mid-rename)."""
    folder = Path(folder)
    set_aside = leftovers(folder, [REPLACED])
    if folder.exists() or not set_aside:
        return
    if len(set_aside) > 1:
        raise DamagedOutput(f"{folder} is missing and several earlier results are set aside beside it "
                            f"({', '.join(p.name for p in set_aside)}); rename the one to keep to {folder.name}")
    replaced = set_aside[0]
    its_partial = folder.with_name(f"{folder.name}{PARTIAL}{replaced.name.rsplit('-', 1)[1]}")
    lock = _try_lock(its_partial) if its_partial.is_dir() else None
    if its_partial.is_dir() and lock is None:
        return  # its run is alive, between its two renames
    try:
        os.replace(replaced, folder)
        print(f"[sparsebert] put back {folder} from {replaced.name}, set aside by a run stopped before it "
              "finished", flush=True)
    finally:
        if lock is not None:
            os.close(lock)


def refuse_leftover_only(folder: Path, rerun: str) -> None:
    """A missing ``folder`` with only a stopped run's leftover beside it: say so, not "not found"."""
    if Path(folder).exists():
        return
    set_aside = leftovers(folder, [REPLACED])
    if set_aside:
        raise DamagedOutput(f"{folder} is not there, but {set_aside[0]} holds its earlier result, set aside by a "
                            f"run stopped between two renames; rename it back to {Path(folder).name}")
    found = leftovers(folder, [PARTIAL])
    if found:
        raise DamagedOutput(f"{folder} is not there, only {found[0].name}, left by a run that was stopped "
                            f"before it finished; re-run `{rerun}`")


# ---------------------------------------------------------------- manifest

# The trainer's resume state: no stage reads it, and it is deleted to save space, so no manifest
# vouches for it (nor is it checked in a manifest that listed it).
RESUME_STATE = re.compile(r"optimizer\.pt|scheduler\.pt|rng_state.*|training_args\.bin|trainer_state\.json")


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


def verify(folder: Path, only=None) -> None:
    """Refuse ``folder`` when a file its manifest lists (of ``only``, the relative paths a reader
    needs, when given) is missing or differs, naming the first. A folder without a manifest of
    ours (an older run, a user's own model) is taken as it is."""
    path = Path(folder) / MANIFEST
    manifest = _read_manifest(path)
    if manifest is None:
        return
    for entry in manifest["files"]:
        if (only is not None and entry["path"] not in only) or RESUME_STATE.fullmatch(Path(entry["path"]).name):
            continue
        problem = _mismatch(Path(folder) / entry["path"], entry)
        if problem:
            raise DamagedOutput(f"{Path(folder) / entry['path']} {problem}: it is not what `sparsebert "
                                f"{manifest['stage']}` wrote ({path}); re-run that stage")


def _read_manifest(path: Path) -> dict | None:
    """``path``'s manifest, or None where there is none of ours: sparsebert's has "stage" and
    "files" (another tool's manifest.json in a user's model folder is not ours to check by)."""
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DamagedOutput(f"{path} cannot be read; re-run the stage that wrote {path.parent}") from None
    if not (isinstance(manifest, dict) and {"stage", "files"} <= manifest.keys()):
        return None
    entries = manifest["files"]
    if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                              and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                                              for e in entries)):
        raise DamagedOutput(f"{path} has a file entry without its path, bytes or sha256; re-run the stage that "
                            f"wrote {path.parent}")
    return manifest


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
    """The files a manifest lists: all but the manifest itself, the build's lock, unfinished
    temporary files and the trainer's resume state."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, LOCK) and PARTIAL not in p.name
                  and not RESUME_STATE.fullmatch(p.name))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
