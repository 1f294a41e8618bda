"""Where things live: the files the package ships, the shared data folder, the cache, safe output folders.

Shipped files are package data, next to the code that uses them: the embedded default's SAE
(`embedded/sae/`), the model-card template (`publishing/templates/`) and the `evaluate` metric module
(`evaluation/dsg_unlearning/`). `resource(name)` gives the path of one, in a checkout and in an install alike.

The shared folder (models and data sets that are not part of the repository) is found in this order:
1. the `DSG_SHARED_DIR` environment variable (or a `--shared` flag that sets it);
2. `../shared` next to the current directory;
3. `../shared` next to the repository that holds this package (a checkout or an editable install).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DSGError
from .outputs import already_exists

PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout that holds this package (source tree or editable install); None in an ordinary install.
CHECKOUT_DIR: Path | None = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None

# What the package ships, relative to PACKAGE_DIR (pyproject.toml lists each as package data).
SHIPPED = {
    "sae": Path("embedded", "sae"),  # the SAE `dsg demo` uses
    "card_template": Path("publishing", "templates", "dsg_model_card.md"),  # model cards
    "metric": Path("evaluation", "dsg_unlearning"),  # the `evaluate` module of `dsg eval`
}


def resource(name: str) -> Path:
    """The path of a shipped file or folder (a key of `SHIPPED`); `DSGError` with what to do if it is missing."""
    path = PACKAGE_DIR / SHIPPED[name]
    if not path.exists():
        raise DSGError(
            f"{SHIPPED[name].as_posix()} is missing from the installed package (looked for {path}); reinstall "
            "modeling_dsg from a complete checkout (`pip install .` in it) or run from the checkout"
        )
    return path


def shared_dir(required: bool = True) -> Path | None:
    """The shared models/data folder; raises `DSGError` if `required` and it cannot be found."""
    env = os.environ.get("DSG_SHARED_DIR")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path.resolve()
        if required:
            raise DSGError(f"DSG_SHARED_DIR={env} is not a folder")
        return None
    candidates = [Path.cwd().parent / "shared"] + ([CHECKOUT_DIR.parent / "shared"] if CHECKOUT_DIR else [])
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    if required:
        raise DSGError(
            "cannot find the shared models/data folder: set DSG_SHARED_DIR or pass --shared DIR "
            "(looked for ../shared next to the current folder and next to the repository)"
        )
    return None


def cache_dir() -> Path:
    """Cache for converted checkpoints (`DSG_CACHE_DIR`, default `~/.cache/modeling_dsg`)."""
    path = Path(os.environ.get("DSG_CACHE_DIR", Path.home() / ".cache" / "modeling_dsg")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary folder that becomes `out` only if the block finishes without error.

    An existing `out` is an error unless `overwrite`; with `overwrite` it is replaced only at the very
    end, so a failed run never leaves a half-written folder and never destroys the old one.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise already_exists(out)
    if out.exists() and not out.is_dir():
        raise DSGError(f"output path {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary folder
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
