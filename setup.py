"""Wheel builds carry the config tree, the presets and the demo data inside the package.

In a checkout they live at the repository root (``conf/``, ``recipes/`` through the
``conf/recipe`` symlink, ``data/demo/``) and an editable install reads them there. A wheel copies
them to ``alignkit/_conf`` and ``alignkit/_data/demo``, where ``alignkit.config.compose`` looks
when the checkout's copies are absent. Everything else is declared in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithConfigTree(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's own trees
        package = Path(self.build_lib) / "alignkit"
        # symlinks are followed: conf/recipe -> recipes/ becomes a real folder; cards' PNGs stay out
        shutil.copytree(ROOT / "conf", package / "_conf", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.png", "cards"))
        shutil.copytree(ROOT / "data" / "demo", package / "_data" / "demo", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigTree})
