"""Nothing outside the package imports a private part of it: tests, the fuzzer, the numerics lab and the
benchmarks reach core through its public modules and the core.testing seam."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "packages" / "core" / "src" / "core"
PUBLIC = {"core", "core.api", "core.ops", "core.reference", "core.testing", "core.tolerance"}
PUBLIC_TREES = ("core.distributed", "core.integrations")
SKIPPED = {".git", ".nox", ".venv", ".whl", "build", "node_modules"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            if node.module == "core":
                for alias in node.names:
                    yield node.lineno, f"core.{alias.name}"


def _is_public(module: str) -> bool:
    if not (module == "core" or module.startswith("core.")):
        return True
    if module in PUBLIC or module.startswith(PUBLIC_TREES):
        return True
    # `from core import attention` names a function, not a module: public unless the name is private.
    name = module.removeprefix("core.")
    return "." not in name and not name.startswith("_") and not (PACKAGE / name).exists()


def _python_files():
    for path in REPO.rglob("*.py"):
        parts = set(path.relative_to(REPO).parts)
        if parts & SKIPPED or any(part.startswith(".") for part in path.relative_to(REPO).parts[:-1]):
            continue
        if PACKAGE in path.parents:
            continue
        yield path


def test_no_private_imports_outside_the_package():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in _python_files()
        for line, module in _imports(path)
        if not _is_public(module)
    ]
    assert not offenders, "private core modules imported from outside the package:\n" + "\n".join(offenders)


def test_the_checker_sees_a_private_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import core.kernels.portable.plans\nfrom core import _plans\nfrom core import attention\n"
    )
    found = [module for _, module in _imports(probe) if not _is_public(module)]
    assert found == ["core.kernels.portable.plans", "core._plans"]
