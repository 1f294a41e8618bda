"""Run the Hub-facing tests against the oldest and the newest transformers this project supports.

A published DSG model's code runs on whatever transformers its user has, so pinning a version in
pyproject.toml protects nobody. This script reads the supported range from pyproject.toml
(`transformers>=OLDEST,<BOUND`), asks the package index for the newest release inside it (and for
the newest of all, which it reports without failing when it lies beyond the range), makes one virtual
environment per version (torch as installed here, that transformers with its serving extras,
accelerate, safetensors, pytest;
the project itself is used from the checkout, not installed), runs each Hub-facing check there and
prints a table, version x check. Exit status 1 when any check fails.

    python .ci/compat.py                       # oldest and newest of the range
    python .ci/compat.py --versions 5.22.0     # any releases
    python .ci/compat.py --venvs DIR           # where the environments live (default: the cache)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# check -> the tests that show it (all run on tiny random models, in a few seconds each)
CHECKS = {
    "remote-code load in a fresh process": ["tests/test_architectures.py::test_remote_code_reload_is_exact"],
    "generation carries the decision": [
        "tests/test_generation_cache.py",
        "tests/test_guard_semantics.py::test_generation_carries_and_updates_the_decision",
        "tests/test_guard_semantics.py::test_decision_taken_on_the_prompt_sticks_during_decoding",
    ],
    "cache == no-cache": ["tests/test_architectures.py::test_generate_with_and_without_cache_agree"],
    "pipeline": ["tests/test_architectures.py::test_pipeline_with_model_object"],
    "device map": ["tests/test_device_map.py"],
    "actions (refuse, monitor)": ["tests/test_actions.py"],
    "dsg serve": ["tests/test_serve.py"],
    "Hub code audit": ["tests/test_hub_code.py"],
}


def supported_range() -> tuple[str, str]:
    """(oldest, upper bound) from pyproject.toml's `transformers>=A,<B`."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', text)
    if not match:
        sys.exit("compat: pyproject.toml does not state transformers as >=OLDEST,<BOUND")
    return match.group(1), match.group(2)


def as_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def newest_release(bound: str | None = None) -> str:
    """The newest final transformers release on the package index (below `bound` when given)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True
    ).stdout
    listed = re.search(r"Available versions: (.*)", out)
    if not listed:
        sys.exit("compat: could not list transformers releases (pip index versions transformers)")
    finals = [v.strip() for v in listed.group(1).split(",") if re.fullmatch(r"[0-9.]+", v.strip())]
    return max((v for v in finals if bound is None or as_tuple(v) < as_tuple(bound)), key=as_tuple)


def environment(version: str, root: Path) -> Path:
    """A virtual environment with transformers==version (made once, then reused)."""
    import torch  # the torch of this interpreter: a local wheel here, never a fresh CUDA download

    folder = root / f"transformers-{version}"
    python = folder / "bin" / "python"
    stamp = folder / "compat-ready"
    if stamp.exists():
        return python
    venv.create(folder, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(
        [*pip, f"transformers[serving]=={version}", "accelerate>=1.0", "safetensors>=0.4", "pytest>=8"], check=True
    )
    stamp.write_text(version)
    return python


def run_check(python: Path, tests: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    return proc.returncode == 0, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", help="transformers releases (default: oldest and newest supported)")
    cache = Path(os.environ.get("DSG_CACHE_DIR", Path.home() / ".cache" / "modeling_dsg"))
    parser.add_argument("--venvs", type=Path, default=cache / "compat", help="where the environments live")
    args = parser.parse_args()
    beyond = None
    if args.versions:
        versions = args.versions
    else:
        oldest, bound = supported_range()
        versions = sorted({oldest, newest_release(bound)}, key=as_tuple)
        latest = newest_release()
        if as_tuple(latest) > as_tuple(versions[-1]):  # released after the range was last widened
            beyond = latest
            versions.append(latest)
    rows, failed = [], False
    for version in versions:
        start = time.time()
        python = environment(version, args.venvs)
        installed = subprocess.run(
            [str(python), "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
        ).stdout.strip()
        results = {name: run_check(python, tests) for name, tests in CHECKS.items()}
        if version != beyond:  # outside the claimed range: reported, not required
            failed |= not all(ok for ok, _ in results.values())
        rows.append((installed, results, time.time() - start))
        for name, (ok, summary) in results.items():
            print(f"transformers {installed}: {name}: {'pass' if ok else 'FAIL'} ({summary})", flush=True)
    print("\n| transformers | " + " | ".join(CHECKS) + " | time |")
    print("|---" * (len(CHECKS) + 2) + "|")
    for installed, results, seconds in rows:
        cells = " | ".join("pass" if ok else "**FAIL**" for ok, _ in results.values())
        note = " (newer than the supported range: widen it when all pass)" if installed == beyond else ""
        print(f"| {installed}{note} | {cells} | {seconds:.0f} s |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
