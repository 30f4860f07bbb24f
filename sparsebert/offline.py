"""Keep every run quiet and offline unless the user asked for the hub.

SparseZoo/SparseML/DeepSparse send analytics (a blocking HTTP call with no timeout) on import
unless ``NM_DISABLE_ANALYTICS`` is set, and Hugging Face libraries read their offline switches
once, at import. So these must be set before any of them is imported.
"""

import os

_QUIET = {
    "NM_DISABLE_ANALYTICS": "1",
    "NM_VERSION_CHECK": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_HUB_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def configure(hub: bool = False) -> None:
    """Disable telemetry always; allow the Hugging Face hub only when ``hub`` is True.

    Must run before ``huggingface_hub``/``datasets``/``transformers`` are imported to take effect.
    """
    for key, value in _QUIET.items():
        os.environ[key] = value
    for key in _HUB_SWITCHES:
        if hub:
            os.environ[key] = "0"
        else:
            os.environ.setdefault(key, "1")
