"""Packaging is declared in pyproject.toml; this file only installs ``hedgehog-lm-eval.pth`` into site-packages
(for wheels and for editable installs), the start-up hook that lets a plain ``lm_eval --model hedgehog`` find our
model type (src/_hedgehog_lm_eval.py says why a hook is needed)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / "src" / "hedgehog-lm-eval.pth"


class BuildPy(build_py):
    """A wheel: the .pth at the root of build_lib, which becomes site-packages."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))


class EditableWheel(editable_wheel):
    """An editable install (``pip install -e .``): the .pth beside setuptools' own path file in the wheel."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, Path(installation_dir) / PTH.name)


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
