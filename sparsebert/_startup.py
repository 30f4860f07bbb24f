"""Run at interpreter start-up by ``sparsebert_modifiers.pth`` (installed with the package).

It costs one small import and acts only when the Neural Magic stack is imported:
- before ``sparsezoo``/``sparseml``/``deepsparse`` load, telemetry is switched off (they send
  analytics, with a blocking call, at import unless ``NM_DISABLE_ANALYTICS`` is set);
- after each SparseML/DeepSparse module named in ``sparsebert.sparseml_mends.AFTER_IMPORT``
  loads, its mend runs: the optimizer wrapper that kept the learning rate at 0, STS-B's label
  crash, the offline metric load, the resumed finished schedule, the recipe's steps per epoch
  under gradient accumulation, recipe lists saved as YAML, OBS pruning's gradient sampler, the QAT
  QConfig's slots and the export loader that dropped a QAT checkpoint's structure, DeepSparse's sigmoid over a
  regression model's output (STS-B served as 0-1 instead of 0-5, in our server and the stock
  ``deepsparse.server`` alike), and the registration of the project's recipe modifiers (so
  SparseML's own console scripts read ``recipes/sparsebert.yaml``).
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

from sparsebert.sparseml_mends import AFTER_IMPORT, mend

_NM_PACKAGES = {"sparsezoo", "sparseml", "deepsparse"}


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _NM_PACKAGES:
            os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
            os.environ.setdefault("NM_VERSION_CHECK", "false")
            return None
        if fullname not in AFTER_IMPORT:
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
            module.__dict__.pop("_sparsebert_mended", None)  # importlib.reload runs it afresh: mend again
            run_module(module)
            mend(module)

        spec.loader.exec_module = exec_then
        return spec


def install() -> None:
    if not any(isinstance(finder, _Hook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
