"""The one check every command runs on the folder it is about to write (`--out`, `--save-best`, ...).

`prepare_output` runs before any expensive work. It refuses, with one `DSGError`:

- an empty path, the file-system root, and (with `--overwrite`) an existing top-level folder or mount point;
- an existing output without `overwrite` (the long-standing rule; kept word for word);
- an output that is, contains, or lies inside any input (a model folder, a base model file, a corpus file,
  an SAE folder, an `--add-to` folder, a baseline, this package's own code), or that is or contains the
  current folder or the home folder: replacing it would delete what the command reads, or the user's files;
- an existing output that is not a folder;
- a place that cannot take a folder: under a file, under /proc or /sys, or a folder that cannot be written.

It returns the resolved path. The replacement itself is `paths.atomic_output_dir` (nothing is removed until
the new folder is complete; Ctrl-C leaves no partial folder).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import DSGError

PACKAGE_DIR = Path(__file__).resolve().parent
PSEUDO_ROOTS = (Path("/proc"), Path("/sys"))


def _resolve(path) -> Path:
    return Path(path).expanduser().resolve()


def _local_inputs(inputs) -> list[tuple[str, Path]]:
    """(label, resolved path) for every input that exists on disk; Hub ids and other names are skipped."""
    found = []
    for label, specs in (inputs or {}).items():
        if specs is None:
            continue
        if isinstance(specs, (str, os.PathLike)):
            specs = [specs]
        for spec in specs:
            if spec is None or not str(spec).strip():
                continue
            try:
                path = Path(spec).expanduser()
                if path.exists():
                    found.append((label, path.resolve()))
            except (OSError, ValueError):  # a name that cannot be a path (Hub id with odd characters, ...)
                continue
    return found


def _guarded_folders() -> list[tuple[str, Path]]:
    """The current and the home folder (either is skipped if it cannot be found)."""
    found = []
    for label, where in (("the current folder", Path.cwd), ("your home folder", Path.home)):
        try:
            found.append((label, where().resolve()))
        except (OSError, RuntimeError, KeyError):
            continue
    return found


def already_exists(out: Path, kind: str = "output folder", more: str = "") -> DSGError:
    """The one "already exists" error of every command (`prepare_output` and `paths.atomic_output_dir`)."""
    return DSGError(f"{kind} {out} already exists{more} (pass --overwrite to replace it)")


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def prepare_output(
    path,
    overwrite: bool = False,
    *,
    inputs=None,
    flag: str = "--out",
    kind: str = "output folder",
    empty_ok: bool = False,
    nested_ok=(),
) -> Path:
    """Check that `path` may be written (and, with `overwrite`, replaced) by a command; return it resolved.

    Args:
        path: the output folder as given (str or path-like).
        overwrite: the command's `--overwrite`.
        inputs: {label: path or list of paths} of what the command reads, e.g.
            {"the --sae folder": sae, "the --forget source": forget}; entries that are not local paths
            (Hub ids, `embedded:...`) or do not exist are ignored. This package's own code is always an input.
        flag: the option that named the output, for the error messages ("--out", "--dry-run", ...).
        kind: what the output is called in the "already exists" message ("output folder", "staging folder").
        empty_ok: an existing empty folder counts as new (publish's STAGING).
        nested_ok: outputs allowed inside an input (not equal to it, not containing it), e.g. DIR/eval,
            the report folder `dsg publish` reads by default.

    Raises `DSGError` (one line) when the output is refused. Leaves nothing behind either way (the
    writability probe is an empty folder removed at once).
    """
    if path is None or not str(path).strip():
        raise DSGError(f"{flag} is empty: give the folder to write")
    out = _resolve(path)
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite:
        empty = out.is_dir() and not any(out.iterdir())
        if not (empty_ok and empty):
            more = " and is not empty" if empty_ok else ""
            raise already_exists(out, kind, more)
    if out == Path(out.anchor):
        raise DSGError(f"{flag} {path} is the file-system root; give a folder of its own")

    for label, folder in _guarded_folders():
        if out == folder:
            raise DSGError(f"{flag} {path} is {label} ({folder}); give a new folder for the output")
        if _inside(folder, out):
            raise DSGError(f"{flag} {out} contains {label} ({folder}); give a new folder for the output")
    allowed = {_resolve(p) for p in nested_ok or () if p is not None}
    for label, inp in [("this package's code", PACKAGE_DIR)] + _local_inputs(inputs):
        if out == inp:
            raise DSGError(f"{flag} {out} is {label}; write the output to a separate folder")
        if _inside(inp, out):
            raise DSGError(f"{flag} {out} contains {label} ({inp}); write the output to a separate folder")
        if _inside(out, inp) and out not in allowed:
            raise DSGError(f"{flag} {out} is inside {label} ({inp}); it must be outside {label}")

    if exists and not out.is_dir():
        raise DSGError(f"{flag} {out} exists and is not a folder")
    if exists and out.parent == Path(out.anchor):
        raise DSGError(f"{flag} {out} is a top-level system folder; it will not be replaced")
    if exists and os.path.ismount(out):
        raise DSGError(f"{flag} {out} is a mount point; it cannot be replaced")
    for root in PSEUDO_ROOTS:
        if out == root or _inside(out, root):
            raise DSGError(f"{flag} {out} is under {root}, which cannot hold files; give another folder")
    _check_writable(out, flag)
    return out


def _check_writable(out: Path, flag: str) -> None:
    """The folder that will hold `out` (its nearest existing ancestor) must be a writable folder."""
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link in the way
            raise DSGError(f"cannot write {flag} {out}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise DSGError(f"cannot write {flag} {out}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dsg-write-check-", dir=parent))  # an empty folder, gone at once
    except OSError as err:
        raise DSGError(f"cannot write {flag} {out}: {parent} is not writable ({err.strerror or err})") from None
