"""The design card's folders install under one import namespace, editable and from a wheel."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"experts": "experts", "circuits": "circuits", "kernels": "kernels", "ui": "ui"}


def test_editable_install_maps_top_level_folders(tmp_path):
    code = ("import importlib.util, workbench, workbench.experts, workbench.circuits, workbench.kernels, workbench.ui;"
            "print(workbench.experts.__file__); print(workbench.kernels.__file__);"
            "print(importlib.util.find_spec('kernels'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    experts, kernels, bare = out.stdout.splitlines()
    assert Path(experts) == ROOT / "experts" / "__init__.py"
    assert Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert bare == "None"  # we do not squat the Hugging Face `kernels` name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy of the tracked tree, so no stale build/ folder can leak into the wheel.
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("workbench-*.whl"))


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for sub in SUBPACKAGES:
        assert f"workbench/{sub}/__init__.py" in names
    assert "workbench/data/prompts.txt" in names
    assert "workbench/models/zoo_weights/tiny-moe.safetensors" in names
    assert "workbench/models/zoo_weights/tiny-moe-se.safetensors" in names
    assert not [n for n in names if n.split("/")[0] in SUBPACKAGES]  # nothing at the top level but workbench
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "workbench = workbench.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_wheel_install_imports(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (f"import sys; sys.path.insert(0, {str(target)!r});"
            "import workbench.experts, workbench.kernels, workbench.circuits, workbench.ui, workbench.data;"
            "print(workbench.kernels.__file__)")
    # -S: no site-packages, so the editable install cannot answer instead of the wheel.
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(target))
