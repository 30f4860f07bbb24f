"""Loading the parity and speed thresholds (deploy/thresholds.yaml, or a user's copy)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

from sparsebert.errors import UserError


class ThresholdError(UserError):
    pass


def default_path() -> Path:
    return Path(str(importlib.resources.files("sparsebert.deploy") / "thresholds.yaml"))


def parity_limits(thresholds: dict, which: str) -> dict:
    """The parity limits of a checkpoint (max_metric_difference, max_logit_difference,
    max_served_score_difference): the INT8 student's own ``int8_`` ones, or the FP32 ones."""
    from sparsebert.runfolder import INT8

    parity = thresholds["parity"]
    prefix = "int8_" if which == INT8 else ""
    keys = ("max_metric_difference", "max_logit_difference", "max_served_score_difference")
    return {**parity, **{key: parity[prefix + key] for key in keys}}


def load(path: Path | None = None) -> dict:
    """The defaults, overlaid with ``path``; unknown sections or keys are refused."""
    defaults = yaml.safe_load(default_path().read_text())
    if path is None:
        return defaults
    try:
        given = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ThresholdError(f"thresholds file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ThresholdError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(given, dict):
        raise ThresholdError(f"{path}: expected sections {sorted(defaults)}")
    for section, values in given.items():
        if section not in defaults or not isinstance(values, dict):
            raise ThresholdError(f"{path}: unknown section {section!r}; known: {sorted(defaults)}")
        for key, value in values.items():
            if key not in defaults[section]:
                raise ThresholdError(f"{path}: unknown key {section}.{key}; known: {sorted(defaults[section])}")
            if not isinstance(value, (int, float)) or value < 0:
                raise ThresholdError(f"{path}: {section}.{key} must be a non-negative number")
            defaults[section][key] = value
    return defaults
