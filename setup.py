"""Only what pyproject.toml cannot say: install ``sparsebert_modifiers.pth`` at the top of
site-packages, for normal and editable installs (see sparsebert/_startup.py for why)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "sparsebert_modifiers.pth"


class BuildWithStartupHook(build_py):
    def run(self):
        super().run()
        # An editable build ignores build_lib; its wheel is assembled in install_lib.
        target = (self.get_finalized_command("install").install_lib
                  if getattr(self, "editable_mode", False) else self.build_lib)
        self.copy_file(PTH, os.path.join(target, PTH))


setup(cmdclass={"build_py": BuildWithStartupHook})
