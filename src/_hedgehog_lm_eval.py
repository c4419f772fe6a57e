"""Start-up hook, run by ``hedgehog-lm-eval.pth`` in site-packages: a plain ``lm_eval --model hedgehog ...`` finds
the ``hedgehog`` model type without importing hedgehog first.

lm-eval (0.4.x) has no plugin discovery: its model table is a fixed mapping in ``lm_eval.models``. This module
waits for that module to be imported, then registers ``hedgehog`` beside the built-in entries as a lazy target
(``hedgehog.eval.lmeval:HedgehogLM``), so torch and hedgehog load only when that model type is asked for. At start-up
it imports nothing and adds one entry to ``sys.meta_path``; it never raises.
"""
import sys

NAME = "hedgehog"
TARGET = "hedgehog.eval.lmeval:HedgehogLM"
WATCHED = "lm_eval.models"


def register():
    """Add the lazy ``hedgehog`` entry to lm-eval's model registry (no-op when present or when lm-eval is off)."""
    try:
        from lm_eval.api.registry import model_registry

        if NAME not in model_registry:
            model_registry.register(NAME, target=TARGET)
    except Exception:  # a start-up hook must never break another program's import
        pass


class _Finder:
    """Finds ``lm_eval.models`` like the path finder does, and runs :func:`register` after its body."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            register()

        loader.exec_module = exec_module
        return spec


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if WATCHED in sys.modules:  # imported before the hook (e.g. this module imported late)
        register()


install()
