"""The core install: a wheel of this package needs torch and nothing else, and trains a model with it."""

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TRAIN_A_MODULE = """
import sys
import torch
from torch import nn
from multinorm.optim import SWAN, CombinedOptimizer, SinkGD

for name in ("numba", "numpy", "transformers", "pandas"):  # none of them is in this environment
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable: the environment is not torch alone")

torch.manual_seed(0)
x = torch.randn(256, 16)
y = x @ torch.randn(16, 4)
for make in (lambda m: SinkGD(m.parameters(), lr=0.02),  # fused=True by default: without numba, the torch path
             lambda m: SWAN(m.parameters(), lr=0.02),
             lambda m: CombinedOptimizer([SinkGD([m[0].weight], lr=0.02), torch.optim.AdamW([m[1].weight], lr=0.01)])):
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 4, bias=False))
    opt = make(model)
    first = last = None
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()
    assert last < 0.5 * first, (type(opt).__name__, first, last)
print("trained")
"""


def _distributions(name: str, seen: set[str]) -> set[str]:
    """`name` and every distribution it requires (extras left out), by installed metadata."""
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    seen.add(key)
    for requirement in metadata.requires(name) or []:
        if "extra ==" in requirement:
            continue
        _distributions(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0], seen)
    return seen


def _torch_alone(folder: Path) -> Path:
    """A folder holding torch and the distributions it requires, and nothing else (links to this environment's
    installed files): the site a fresh environment with only torch installed would have."""
    folder.mkdir()
    for name in _distributions("torch", set()):
        for top in {Path(f).parts[0] for f in metadata.distribution(name).files or []}:
            source = Path(metadata.distribution(name).locate_file(top))
            if source.exists() and not (folder / top).exists() and top != "..":
                (folder / top).symlink_to(source)
    return folder


@pytest.mark.slow
def test_the_core_wheel_needs_torch_alone_and_trains_with_it(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"  # built from a copy: the checkout gets no build/ folder
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--wheel-dir", str(dist), str(source)], check=True, timeout=300)
    wheel = next(dist.glob("multinorm-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        meta = email.message_from_bytes(archive.read(next(n for n in archive.namelist()
                                                          if n.endswith(".dist-info/METADATA"))))
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert [re.split(r"[\s<>=!~;]", r, maxsplit=1)[0] for r in core] == ["torch"]
    assert {"fast", "train", "baselines", "studies", "dev"} <= set(meta.get_all("Provides-Extra"))

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    (site / "torch_alone.pth").write_text(str(_torch_alone(tmp_path / "torch-alone")) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(python), "-c", TRAIN_A_MODULE], env=clean, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("trained"), result.stderr[-3000:]
