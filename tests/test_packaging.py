"""An ordinary (non-editable) install carries everything the package needs (issue 10, item 5).

The SAE `dsg demo` uses (modeling_dsg/embedded/sae/), the model-card template
(modeling_dsg/publishing/templates/) and the `evaluate` metric module (modeling_dsg/evaluation/dsg_unlearning/)
are package data (pyproject.toml). These tests build a wheel from a copy of the
tree, as `pip install .` does, unpack it and check, in a fresh interpreter that sees only the
unpacked wheel and this environment's site-packages (no .pth files, so no editable install and no
checkout), that every shipped resource the code resolves lies inside the installed package and that
the `dsg` command line starts. The full check (`pip install .` into a new venv, then `dsg demo` from
another folder) is recorded in the issue; it takes minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from modeling_dsg import paths
from modeling_dsg.errors import DSGError

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
EXPECTED = [  # files a wheel must hold, each needed at run time
    "modeling_dsg/embedded/sae/smollm2-135m-layer6/cfg.json",
    "modeling_dsg/embedded/sae/smollm2-135m-layer6/sae_weights.safetensors",
    "modeling_dsg/publishing/templates/dsg_model_card.md",
    "modeling_dsg/evaluation/dsg_unlearning/dsg_unlearning.py",
]

CHECK = r"""
import json, sys
from pathlib import Path
import modeling_dsg
from modeling_dsg import paths
from modeling_dsg.publishing.cards import default_template
from modeling_dsg.embedded.demo import default_sae
from modeling_dsg.evaluation.scoring import METRIC_DIR, load_scorer

package = Path(modeling_dsg.__file__).resolve().parent
resolved = {name: paths.resource(name) for name in paths.SHIPPED}
resolved.update(demo_sae=default_sae(), card_template_used=default_template(), metric_dir=METRIC_DIR)
scorer, how = load_scorer()
print(json.dumps({
    "package": str(package), "checkout": None if paths.CHECKOUT_DIR is None else str(paths.CHECKOUT_DIR),
    "resolved": {k: str(Path(v).resolve()) for k, v in resolved.items()},
    "exists": {k: Path(v).exists() for k, v in resolved.items()},
    "scorer": how,
}))
"""


def _copy_tree(dst: Path) -> Path:
    """The files a build reads: pyproject.toml, the readme and the package tree."""
    dst.mkdir()
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "modeling_dsg", dst / "modeling_dsg", ignore=ignore)
    return dst


def _backend(src: Path, hook: str, out: Path) -> Path:
    """Run setuptools' PEP 517 `hook` ("build_wheel", "build_sdist") in `src`; the built file."""
    code = f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    return _backend(_copy_tree(tmp / "src"), "build_wheel", tmp / "dist")


def test_shipped_resources_are_package_data():
    """Every `paths.SHIPPED` item lies in the package and is matched by a package-data pattern."""
    patterns = [
        (package.replace(".", "/"), glob) for package, globs in SETUPTOOLS["package-data"].items() for glob in globs
    ]
    for name, rel in paths.SHIPPED.items():
        path = paths.PACKAGE_DIR / rel
        files = [
            f for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file() and "__pycache__" not in f.parts
        ]
        assert files, f"{name}: {path} holds no file"
        for f in files:
            where = f.relative_to(ROOT).as_posix()
            assert any(Path(where).match(f"{package}/{glob}") for package, glob in patterns), (
                f"{where} is not package data"
            )


def test_the_checkout_resolves_its_own_files():
    assert paths.CHECKOUT_DIR == ROOT
    for name in paths.SHIPPED:
        assert paths.resource(name).exists() and paths.PACKAGE_DIR in paths.resource(name).parents


def test_a_missing_resource_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path)
    with pytest.raises(DSGError, match=r"embedded/sae is missing .*reinstall"):
        paths.resource("sae")


def test_wheel_holds_the_shipped_files_and_only_modeling_dsg(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for rel in EXPECTED:
        assert rel in names, rel
    top = {n.split("/")[0] for n in names}
    assert top == {"modeling_dsg", wheel.name.split("-py3")[0] + ".dist-info"}, top  # no stray top-level package


def test_installed_wheel_resolves_everything_inside_the_package(wheel, tmp_path):
    site_dir = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site_dir)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # -S: no site processing, so no .pth file (an editable install's finder) runs; this environment's
    # site-packages are given as plain paths after the unpacked wheel.
    env_paths = [str(site_dir)] + [p for p in site.getsitepackages() if Path(p).is_dir()]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(env_paths),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_DATASETS_OFFLINE": "1",
    }
    # the `dsg` console script, as pip writes it, in an interpreter of its own (nothing imported before)
    entry = next(
        line.split("=", 1)[1].strip()
        for line in (next(site_dir.glob("*.dist-info")) / "entry_points.txt").read_text().splitlines()
        if line.replace(" ", "").startswith("dsg=")
    )
    module, func = entry.split(":")
    script = f"import sys; from {module} import {func}; sys.argv = ['dsg', 'demo', '--help']; sys.exit({func}())"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "--sae" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]

    proc = subprocess.run(
        [sys.executable, "-S", "-c", CHECK], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    package = Path(out["package"])
    assert package == (site_dir / "modeling_dsg").resolve()
    assert out["checkout"] is None
    for name, where in out["resolved"].items():
        assert out["exists"][name], f"{name}: {where} does not exist"
        assert package in Path(where).parents, f"{name} resolves outside the installed package: {where}"
    assert out["scorer"].startswith("evaluate.load("), out["scorer"]


def test_sdist_carries_the_shipped_files(tmp_path):
    """`python -m build` goes through an sdist: it must carry the package data too."""
    sdist = _backend(_copy_tree(tmp_path / "src"), "build_sdist", tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in EXPECTED:
        assert rel in names, rel
