"""Run at interpreter start-up by ``sparsebert_modifiers.pth`` (installed with the package).

It costs one small import and acts only when the Neural Magic stack is imported:
- before ``sparsezoo``/``sparseml``/``deepsparse`` load, telemetry is switched off (they send
  analytics, with a blocking call, at import unless ``NM_DISABLE_ANALYTICS`` is set);
- after ``sparseml.pytorch.sparsification`` loads, the project's recipe modifiers are registered,
  so SparseML's own console scripts (``sparseml.transformers.train.text_classification``) can
  read ``recipes/sparsebert.yaml``. SparseML has no plug-in mechanism to do this otherwise.
"""

import importlib.abc
import importlib.util
import os
import sys

_NM_PACKAGES = {"sparsezoo", "sparseml", "deepsparse"}
_MODIFIER_HOST = "sparseml.pytorch.sparsification"


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _NM_PACKAGES:
            os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
            os.environ.setdefault("NM_VERSION_CHECK", "false")
            return None
        if fullname != _MODIFIER_HOST:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_and_register(module):
            run_module(module)
            importlib.import_module("sparsebert.pipeline.modifiers")

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if not any(isinstance(finder, _Hook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
