"""A model published as a zip split over PyPI wheels (all-mpnet-base-v2) is assembled into a
model folder only when every part and the whole archive match their checksums: tested on a
small fake split laid out as the real wheels are."""

import hashlib
import io
import json
import zipfile

import pytest

from sparsebert import models
from sparsebert.cli import main

PACKAGES = tuple(f"fake-model-pypi-part-{i:03d}" for i in range(1, 4))


def _archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("fake-model/config.json", json.dumps({"model_type": "mpnet", "hidden_size": 8}))
        zipped.writestr("fake-model/vocab.txt", "[PAD]\n" * 5000)  # large enough to span every part
        zipped.writestr("fake-model/1_Pooling/config.json", "{}")
        zipped.writestr("fake-model/desktop.ini", "[.ShellClassInfo]")
        zipped.writestr("README.txt", "outside the model folder")
    return buffer.getvalue()


def _split(archive: bytes, count: int) -> list[bytes]:
    size = -(-len(archive) // count)
    return [archive[i * size:(i + 1) * size] for i in range(count)]


def _wheels(folder, parts):
    """One wheel per part, named and laid out as the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (package, part) in enumerate(zip(PACKAGES, parts), start=1):
        with zipfile.ZipFile(folder / f"{package.replace('-', '_')}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"fake-model-pypi-part_{index:03d}/__init__.py", "")
            wheel.writestr(f"fake-model-pypi-part_{index:03d}/input/fake-model.zip.{index:03d}", part)
    return folder


@pytest.fixture
def fake(monkeypatch, tmp_path):
    archive = _archive()
    parts = _split(archive, len(PACKAGES))
    spec = models.SplitModel("fake-model", PACKAGES, "0.0.1", tuple(hashlib.sha256(p).hexdigest() for p in parts),
                             hashlib.sha256(archive).hexdigest(), "fake-model", aliases=("someone/fake-model",))
    monkeypatch.setitem(models.INSTALLABLE, spec.name, spec)
    monkeypatch.setenv("SPARSEBERT_MODELS", str(tmp_path / "home"))
    return spec, parts, tmp_path


def test_the_parts_are_joined_into_the_model_folder(fake):
    spec, parts, tmp_path = fake
    assert all(len(p) > 0 for p in parts)
    with pytest.raises(models.PretrainedModelNotFound, match="sparsebert models install fake-model"):
        models.resolve_model("fake-model")
    assert main(["models", "install", "fake-model", "--wheels", str(_wheels(tmp_path / "wheels", parts))]) == 0
    folder = tmp_path / "home" / "fake-model"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == \
        ["1_Pooling/config.json", "config.json", "vocab.txt"]  # no desktop.ini, nothing from outside the folder
    assert (folder / "vocab.txt").read_text() == "[PAD]\n" * 5000
    assert models.resolve_model("fake-model") == str(folder)
    assert models.resolve_model("someone/fake-model") == str(folder)  # its hub name finds it too
    assert not models.is_hub_name("fake-model")
    assert models.install("fake-model", wheels=tmp_path / "nowhere") == folder  # installed: nothing read again


def test_a_damaged_part_is_refused_and_nothing_is_installed(fake, capsys):
    spec, parts, tmp_path = fake
    damaged = list(parts)
    damaged[1] = damaged[1][:-1] + bytes([damaged[1][-1] ^ 1])
    assert main(["models", "install", "fake-model", "--wheels", str(_wheels(tmp_path / "wheels", damaged))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part 2 of fake-model has SHA-256" in err[0], err
    assert not (tmp_path / "home" / "fake-model").exists()
    assert [p.name for p in (tmp_path / "home").iterdir()] == [".fake-model.lock"]  # the scratch folder went too


def test_a_missing_part_and_an_unknown_model_are_refused(fake, capsys):
    spec, parts, tmp_path = fake
    wheels = _wheels(tmp_path / "wheels", parts)
    next(wheels.glob("fake_model_pypi_part_003-*")).unlink()
    assert main(["models", "install", "fake-model", "--wheels", str(wheels)]) == 2
    assert "no wheel of fake-model-pypi-part-003 0.0.1 (part 3 of fake-model)" in capsys.readouterr().err
    assert main(["models", "install", "no-such-model", "--wheels", str(wheels)]) == 2
    assert "no installable model 'no-such-model'; known:" in capsys.readouterr().err


def test_parts_in_the_wrong_order_fail_the_archive_checksum(fake, capsys):
    """Each part is right on its own, but the joined archive is not the one published."""
    spec, parts, tmp_path = fake
    swapped = models.SplitModel(spec.name, spec.packages, spec.version,
                                (spec.parts_sha256[1], spec.parts_sha256[0], spec.parts_sha256[2]),
                                spec.archive_sha256, spec.folder)
    models.INSTALLABLE[spec.name] = swapped
    wheels = _wheels(tmp_path / "wheels", [parts[1], parts[0], parts[2]])
    with pytest.raises(models.InstallError, match="the joined parts of fake-model have SHA-256"):
        models.install("fake-model", wheels=wheels)
    assert not (tmp_path / "home" / "fake-model").exists()


def test_what_a_killed_install_left_is_cleared_and_a_foreign_folder_is_kept(fake, capsys):
    spec, parts, tmp_path = fake
    home = tmp_path / "home"
    (home / ".fake-model.installing" / "model").mkdir(parents=True)  # a killed install's scratch
    (home / ".fake-model.installing" / "fake-model.zip").write_bytes(b"half")
    models.install("fake-model", wheels=_wheels(tmp_path / "wheels", parts))
    assert sorted(p.name for p in home.iterdir()) == [".fake-model.lock", "fake-model"]
    own = tmp_path / "own"
    (own / "fake-model").mkdir(parents=True)
    (own / "fake-model" / "notes.txt").write_text("mine")
    assert main(["models", "install", "fake-model", "--dir", str(own), "--wheels", str(tmp_path / "wheels")]) == 2
    assert "exists and is not a model folder" in capsys.readouterr().err
    assert (own / "fake-model" / "notes.txt").read_text() == "mine"


def test_two_installs_of_one_model_at_once_both_end_with_it_installed(fake):
    from concurrent.futures import ThreadPoolExecutor

    spec, parts, tmp_path = fake
    wheels = _wheels(tmp_path / "wheels", parts)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: models.install("fake-model", wheels=wheels, progress=lambda line: None),
                                range(2)))
    assert folders == [tmp_path / "home" / "fake-model"] * 2
    assert (folders[0] / "vocab.txt").read_text() == "[PAD]\n" * 5000
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [".fake-model.lock", "fake-model"]
