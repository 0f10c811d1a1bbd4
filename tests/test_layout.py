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


def private_torch_uses(source: str) -> list[str]:
    """Imports of a private torch module (a dotted name with a part starting with "_", e.g. torch.optim._muon)
    and assignments to an attribute of torch or of a torch module (patching)."""
    found = []
    torch_names = {"torch"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] == "torch":
                    if any(part.startswith("_") for part in module.split(".")[1:]):
                        found.append(f"import {module}")
            if isinstance(node, ast.Import):
                torch_names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("torch")}
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                base = target
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(target, ast.Attribute) and isinstance(base, ast.Name) and base.id in torch_names:
                    found.append(f"assignment to {ast.unparse(target)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and node.args:
            if isinstance(node.args[0], ast.Name) and node.args[0].id in torch_names:
                found.append(f"setattr({node.args[0].id}, ...)")
    return found


def test_the_library_neither_imports_nor_patches_private_torch_modules():
    uses = {_module_name(p): private_torch_uses(p.read_text()) for p in library_modules()}
    assert not {k: v for k, v in uses.items() if v}
    # the check catches what the Muon wrapper used to do
    patched = ("import torch.optim._muon as m\nimport torch\nm._zeropower = f\ntorch.optim.x = 1\n"
               "setattr(torch, 'y', 2)\n")
    assert private_torch_uses(patched) == ["import torch.optim._muon", "assignment to m._zeropower",
                                           "assignment to torch.optim.x", "setattr(torch, ...)"]


def test_no_module_imports_or_patches_a_private_torch_name():
    """Beyond the library (which patches nothing), the studies and benchmarks import no private torch module
    and assign no private torch attribute either (the communication count wraps public collectives)."""
    def private(use: str) -> bool:
        if use.startswith("import "):
            return True
        name = use.removeprefix("assignment to ").split(".")[-1]
        return name.startswith("_")

    every = {_module_name(p): [u for u in private_torch_uses(p.read_text()) if private(u)]
             for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in every.items() if v}
    assert PACKAGE / "bench" / "measure.py" in set(PACKAGE.rglob("*.py"))


def test_the_benchmarks_stand_above_the_studies():
    """Within the reproduction, `multinorm.bench` uses the studies' statistics and tables; no study imports it."""
    studies = [p for p in PACKAGE.rglob("*.py") if _module_name(p).startswith("multinorm.studies")]
    offenders = {_module_name(p): sorted(n for n in _imports(p) if n.startswith("multinorm.bench")) for p in studies}
    assert not {k: v for k, v in offenders.items() if v}
