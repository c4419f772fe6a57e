"""The lower layers import nothing from above them, not even inside functions (where a cycle hides)."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hedgehog"

# module -> the hedgehog modules it may import (its own layer and those below)
BELOW = {"state": set(), "errors": set()}
BELOW["feature_maps"] = {"ops", "errors"}
BELOW["losses"] = {"ops", "errors"}
BELOW["metrics"] = {"ops", "errors"}
BELOW["attention"] = {"ops", "feature_maps", "losses", "state", "errors"}
BELOW["generation"] = {"attention", "state", "errors"} | BELOW["attention"]
BELOW["train/engine"] = {"errors"}  # the training engine knows devices and processes, not models or jobs
BELOW["ops/backends"] = set()


def _imports(path: Path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hedgehog"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("hedgehog"))
    return {n.split(".")[1] for n in names if "." in n}


@pytest.mark.parametrize("module", sorted(BELOW))
def test_module_imports_only_from_below(module):
    found = _imports(SRC / f"{module}.py") - {module}
    assert found <= BELOW[module], f"hedgehog.{module} imports {sorted(found - BELOW[module])} from above it"

