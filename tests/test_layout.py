"""The package's two floors: the library (optimizers, operators, model, data, trainer, distributed) never imports
the reproduction (`multinorm.studies`, `multinorm.bench`), and importing the optimizers loads torch and nothing
heavier."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "multinorm"
REPRODUCTION = ("multinorm.studies", "multinorm.bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement of `source` names (also those inside functions), relative ones resolved
    from `module`."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def library_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if not _module_name(p).startswith(REPRODUCTION)]


def test_the_library_never_imports_the_reproduction():
    library = library_modules()
    assert {"multinorm.optim.sinkgd", "multinorm.train.loop", "multinorm.normalize"} <= {_module_name(p) for p in library}
    offenders = {_module_name(p): sorted(n for n in _imports(p) if n.startswith(REPRODUCTION)) for p in library}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_layering_check_sees_relative_and_lazy_imports():
    source = "import torch\nfrom .config import TrainConfig\n\ndef f():\n    from ..studies import report\n"
    names = imports_of(source, "multinorm.train.loop")
    assert {"torch", "multinorm.train.config", "multinorm.studies", "multinorm.studies.report"} <= names
    assert "multinorm.optim.base" in imports_of("from . import base\n", "multinorm.optim", is_package=True)


def test_importing_the_optimizers_loads_torch_and_nothing_heavier():
    src = str(PACKAGE.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import multinorm.optim, multinorm.normalize\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'multinorm'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    assert out == "[]", f"import multinorm.optim also loads: {out}"
