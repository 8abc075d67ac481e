"""The packages are layers that only point down: proofs <- trainer <- audit <- rewards.

Every ``import`` and ``from ... import`` in every module is read with :mod:`ast`, wherever it
sits (module level, inside a function, under ``if TYPE_CHECKING:``), so a lazy import cannot hide
a cycle. ``proofs`` is pure cryptography and imports neither torch nor web3 (STYLE.md).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("proofs", "trainer", "audit", "rewards")  # each may import only those before it
PROOFS_FORBIDDEN = ("torch", "web3", "eth_account", "eth_tester")  # no ML, no chain in proofs


def imported(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree`` (relative ones resolved)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # "from . import x" stays in the package; "from .. import" leaves it
                yield node.lineno, package if node.level == 1 else ""
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args:
            name = node.args[0]  # importlib.import_module("rewards.x") is an import too
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                yield node.lineno, name.value


def _dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def violations(root: Path) -> list[str]:
    """Each upward or forbidden import under ``root`` as ``file:line: what``."""
    found = []
    for rank, package in enumerate(LAYERS):
        higher = LAYERS[rank + 1 :]
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            where = path.relative_to(root)
            for line, module in imported(tree, package):
                top = module.split(".")[0]
                if top == "":
                    found.append(f"{where}:{line}: relative import beyond {package}/")
                elif top in higher:
                    found.append(f"{where}:{line}: {package} imports {module} (a higher layer)")
                elif package == "proofs" and top in PROOFS_FORBIDDEN:
                    found.append(f"{where}:{line}: proofs imports {module}")
    return found


def test_no_package_imports_a_higher_layer() -> None:
    problems = violations(ROOT)
    assert not problems, "imports that point up:\n" + "\n".join(problems)


def test_every_layer_has_modules() -> None:
    """A renamed or moved package must not leave the check above with nothing to read."""
    for package in LAYERS:
        assert list((ROOT / package).rglob("*.py")), package


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("audit", "def f():\n    from rewards.analyst import Analyst\n", "audit imports rewards"),
        ("trainer", "if TYPE_CHECKING:\n    import audit.beacon\n", "trainer imports audit"),
        ("proofs", "import trainer.store\n", "proofs imports trainer"),
        ("proofs", "def g():\n    import torch\n", "proofs imports torch"),
        ("proofs", "from web3 import Web3\n", "proofs imports web3"),
        ("audit", "from .. import rewards\n", "relative import beyond audit/"),
        ("trainer", "importlib.import_module('rewards.cli')\n", "trainer imports rewards"),
    ],
)
def test_the_check_sees_hidden_upward_imports(
    tmp_path: Path, package: str, source: str, expected: str
) -> None:
    for name in LAYERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("from . import x\nimport proofs.hashing\n")
    (tmp_path / package / "bad.py").write_text(source)
    problems = violations(tmp_path)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith(f"{package}/bad.py:")
