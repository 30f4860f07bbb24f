"""Run at interpreter start-up by ``sparsebert_modifiers.pth`` (installed with the package).

It costs one small import and acts only when the Neural Magic stack is imported:
- before ``sparsezoo``/``sparseml``/``deepsparse`` load, telemetry is switched off (they send
  analytics, with a blocking call, at import unless ``NM_DISABLE_ANALYTICS`` is set);
- after ``sparseml.pytorch.sparsification`` loads, the project's recipe modifiers are registered,
  so SparseML's own console scripts (``sparseml.transformers.train.text_classification``) can
  read ``recipes/sparsebert.yaml``. SparseML has no plug-in mechanism to do this otherwise;
- after ``sparseml.transformers.text_classification`` loads, its offline failure is mended (see
  ``_offline_accuracy_metric``).
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

_NM_PACKAGES = {"sparsezoo", "sparseml", "deepsparse"}


def _register_modifiers(module) -> None:
    importlib.import_module("sparsebert.pipeline.modifiers")


def _offline_accuracy_metric(module) -> None:
    """The script always loads the hub's "accuracy" metric script, though with train/validation
    files it computes accuracy itself and never uses it; offline that load raises. Only that
    case is answered with None; every other load is unchanged."""
    load_metric = module.load_metric

    def load_metric_offline(path, *args, **kwargs):
        try:
            return load_metric(path, *args, **kwargs)
        except (ConnectionError, FileNotFoundError, OSError):
            if path == "accuracy" and os.environ.get("HF_DATASETS_OFFLINE") == "1":
                return None
            raise

    module.load_metric = load_metric_offline


_AFTER_IMPORT = {
    "sparseml.pytorch.sparsification": _register_modifiers,
    "sparseml.transformers.text_classification": _offline_accuracy_metric,
}


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _NM_PACKAGES:
            os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
            os.environ.setdefault("NM_VERSION_CHECK", "false")
            return None
        then = _AFTER_IMPORT.get(fullname)
        if then is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_then(module):
            run_module(module)
            then(module)

        spec.loader.exec_module = exec_then
        return spec


def install() -> None:
    if not any(isinstance(finder, _Hook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
