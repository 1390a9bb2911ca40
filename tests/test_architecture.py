"""The package imports run one way, down the stack: no package imports one above it, and packages
on the same level do not import each other. A new module goes into a level here, so the test fails
until somebody decides where it belongs."""

import ast
from pathlib import Path

import koff

# Lowest first. Within a level, packages are independent of each other.
LEVELS = [
    {"errors", "paths"},
    {"io", "locks"},
    {"tensor_files"},
    {"models"},
    {"data", "masks", "memories", "routing", "scoring"},
    {"config", "model"},
    {"evaluation", "formats", "plan"},
    {"analysis", "export", "runtime", "training"},
    {"experiments", "server"},
    {"cli"},
]
ROOT = Path(koff.__file__).parent
ENTRY_POINTS = {"__init__", "__main__"}  # koff.load() and `python -m koff` stand above everything


def level_of(package: str) -> int:
    for level, packages in enumerate(LEVELS):
        if package in packages:
            return level
    raise AssertionError(f"koff.{package} is in no level of {__file__}: add it where it belongs")


def koff_imports(path: Path) -> set[str]:
    """The top-level koff packages a module imports (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "koff" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_run_down_the_stack():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        package = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if package in ENTRY_POINTS:
            continue
        for imported in koff_imports(path) - {package}:
            if level_of(imported) >= level_of(package):
                wrong.append(f"{relative} imports koff.{imported}")
    assert not wrong, "imports that run up or across the stack:\n" + "\n".join(wrong)
