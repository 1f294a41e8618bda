"""`dsg build` bad inputs: each ends in ONE `dsg: error: ...` line (the last one, no traceback) and exit
code 2, and leaves no output folder behind, not even a temporary one beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_build import SEQ_LEN, cli, get_world

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Bad input files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "schema.jsonl").write_text(json.dumps({"body": "x" * 80}) + "\n")
    (root / "broken.jsonl").write_text(
        '{"text": "fine and long enough to be a document, surely more than fifty chars"}\n{oops\n'
    )
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("too short\n\nalso short\n")
    (root / "not_dsg").mkdir()
    (root / "not_dsg" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "no_config").mkdir()
    (root / "no_cfg_sae").mkdir()
    return root


def build_args(world, **changes) -> list:
    """`dsg build` arguments for a valid build, with some replaced (a value of None drops the flag)."""
    args = {
        "--base": [world.base],
        "--sae": [world.sae_z],
        "--forget": world.forget_sources,
        "--retain": world.retain_sources,
        "--seq-len": [SEQ_LEN],
        "--batch-size": [64],
    }
    args.update(changes)
    out = []
    for flag, values in args.items():
        if values is not None:
            out += [flag, *([values] if not isinstance(values, list) else values)]
    return out


def assert_one_error(code: int, err: str, message: str):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("dsg: error: "), err[-2000:]
    assert message in lines[-1], lines[-1]
    assert sum("error" in line.lower() for line in lines) == 1, err[-2000:]
    assert "Traceback" not in err


CASES = {
    # missing files
    "missing forget file": (dict(**{"--forget": ["{bad}/nope.txt"]}), "text source {bad}/nope.txt does not exist"),
    "missing retain file": (
        dict(**{"--retain": ["{bad}/nope.parquet"]}),
        "text source {bad}/nope.parquet does not exist",
    ),
    "missing base model": (dict(**{"--base": ["{bad}/no_model"]}), "is not a model folder, a .gguf file or a Hub id"),
    "base without config": (dict(**{"--base": ["{bad}/no_config"]}), "has no config.json"),
    "missing SAE": (dict(**{"--sae": ["{bad}/no_sae"]}), "is not a sae-lens folder or RELEASE:SAE_ID"),
    "SAE without cfg.json": (dict(**{"--sae": ["{bad}/no_cfg_sae"]}), "has no cfg.json"),
    # wrong schema
    "jsonl without text or question fields": (
        dict(**{"--forget": ["{bad}/schema.jsonl"]}),
        "has neither a 'text' field nor question/choices records",
    ),
    "jsonl that is not JSON": (dict(**{"--retain": ["{bad}/broken.jsonl"]}), "broken.jsonl:2: not valid JSON"),
    "missing --text-field": (dict(**{"--text-field": ["content"]}), "has no field 'content'"),
    # empty corpora
    "empty corpus": (dict(**{"--forget": ["{bad}/empty.txt"]}), "text source {bad}/empty.txt is empty"),
    "no document over 50 characters": (
        dict(**{"--retain": ["{bad}/short.txt"]}),
        "retain corpus: the corpus has no document longer than 50 characters",
    ),
    # SAE and model do not match
    "SAE d_in does not match": (
        dict(**{"--sae": ["{world}/sae_narrow"]}),
        "the SAE's d_in (16) does not match the model's hidden size (32)",
    ),
    "layer out of range": (dict(**{"--layer": ["99"]}), "layer 99 is out of range: the model has 4 layers (0..3)"),
    "rows longer than the model's context": (
        dict(**{"--seq-len": ["300"]}),
        "--seq-len 300 is longer than the model's context (256 tokens, max_position_embeddings)",
    ),
    # --add-to something else than a DSG model, or no model at all
    "add-to a non-DSG model": (
        dict(**{"--base": None, "--add-to": ["{world}/base"]}),
        "not a DSG model (model_type 'llama')",
    ),
    "add-to a folder without config": (
        dict(**{"--base": None, "--add-to": ["{bad}/no_config"]}),
        "not a model folder (no config.json)",
    ),
    "neither --base nor --add-to": (
        dict(**{"--base": None}),
        "pass --base MODEL (or --add-to an existing DSG folder)",
    ),
    # options out of range, refused before anything is loaded
    "threshold percentile over 100": (
        dict(**{"--threshold-percentile": ["120"]}),
        "--threshold-percentile must be between 0 and 100, got 120",
    ),
    "no features": (dict(**{"--n-features": ["0"]}), "--n-features must be at least 1, got 0"),
    "zero clamp": (dict(**{"--clamp": ["0"]}), "--clamp must be a finite number > 0, got 0.0"),
    "heldout fraction 1": (dict(**{"--heldout-fraction": ["1"]}), "--heldout-fraction must be in [0, 1), got 1.0"),
    "seq-len 1": (dict(**{"--seq-len": ["1"]}), "--seq-len must be at least 2, got 1"),
    "empty name": (dict(**{"--name": [" "]}), "--name must be a non-empty topic name, got ' '"),
}


def _fill(value, world, bad):
    if value is None:
        return None
    return [str(v).format(bad=bad, world=world.root) for v in value]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_build_input(world, bad, tmp_path, capfd, case):
    changes, message = CASES[case]
    changes = {flag: _fill(value, world, bad) for flag, value in changes.items()}
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    code = cli("build", *build_args(world, **changes), "--out", out)
    err = capfd.readouterr().err
    assert_one_error(code, err, message.format(bad=bad, world=world.root))
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder left beside it either


def test_existing_output_folder_is_refused_and_untouched(world, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = cli("build", *build_args(world), "--out", out)
    assert_one_error(
        code, capfd.readouterr().err, f"output folder {out} already exists (pass --overwrite to replace it)"
    )
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # --add-to its own source folder without --overwrite: refused too, and the folder is intact
    files = {p.name: p.read_bytes() for p in world.main.iterdir()}
    code = cli(
        "build", *build_args(world, **{"--base": None}), "--add-to", world.main, "--name", "other", "--out", world.main
    )
    assert_one_error(code, capfd.readouterr().err, "already exists")
    assert {p.name: p.read_bytes() for p in world.main.iterdir()} == files


def test_the_command_line_exits_2_in_a_fresh_process(world, tmp_path):
    """The real `python -m modeling_dsg.cli` process: exit status 2 and only the error line on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    argv = [str(a) for a in build_args(world, **{"--forget": [str(tmp_path / "nope.jsonl")]})]
    proc = subprocess.run(
        [sys.executable, "-m", "modeling_dsg.cli", "build", *argv, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_error(proc.returncode, proc.stderr, f"text source {tmp_path / 'nope.jsonl'} does not exist")
    assert proc.stderr.strip().count("\n") == 0  # nothing but the error line
    assert proc.stdout == "" and not out.exists() and os.listdir(tmp_path) == []
