"""`--overwrite` replaces the output only (issue 15).

An output path that is, contains or lies inside an input, that is or contains the current or the home
folder, that is empty or the file-system root, or that cannot be written is refused before any work:
exit code 2, one `dsg: error: ...` line, no traceback, and every file byte-identical afterwards.
The three known cases first (each destroyed data before the fix), then the rule for every command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny

from modeling_dsg import cli
from modeling_dsg.errors import DSGError
from modeling_dsg.outputs import prepare_output
from modeling_dsg.publishing import publish as pub

WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega".split()


def snapshot(*roots) -> dict:
    """{path: bytes or "<dir>"} for everything under `roots` (links as their targets' text)."""
    found = {}
    for root in roots:
        root = Path(root)
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[str(path)] = "<dir>"
            else:
                found[str(path)] = path.read_bytes()
    return found


def assert_refused(code: int, err: str, *phrases: str):
    """Exit 2, exactly one line on stderr, a `dsg: error:` line naming the problem, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("dsg: error: "), lines[0]
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def mcq_records(n: int, seed: int) -> list[dict]:
    return [
        {
            "question": " ".join(WORDS[(seed + i + k) % len(WORDS)] for k in range(6)) + "?",
            "choices": [WORDS[(seed + i + k) % len(WORDS)] for k in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def corpus(n: int, seed: int) -> str:
    docs = [" ".join(WORDS[(seed * 7 + i * 3 + k) % len(WORDS)] for k in range(20)) for i in range(n)]
    return "\n\n".join(docs) + "\n"


@pytest.fixture()
def place(tmp_path, monkeypatch):
    """tmp/inputs: a tiny base model, a tiny DSG folder, an SAE folder, corpora and question files;
    tmp/work: the current folder, holding a file; HOME is tmp/home."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    base = inputs / "base"
    tiny.tiny_base("llama").save_pretrained(base)
    tiny.tiny_tokenizer().save_pretrained(base)
    tiny.make_tiny_dsg(inputs / "dsg")
    sae = inputs / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text("{}")
    (inputs / "forget.txt").write_text(corpus(6, 1))
    (inputs / "retain.txt").write_text(corpus(6, 2))
    (inputs / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcq_records(4, 0)))
    (inputs / "retain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcq_records(4, 5)))
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


# ---------------------------------------------------------------------------------- the known cases
def test_eval_out_equal_to_the_model_folder_is_refused(tmp_path, capfd):
    """Case 1: `dsg eval D ... --out D --overwrite` replaced the model folder with the report."""
    model = tiny.make_tiny_dsg(tmp_path / "D")
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in mcq_records(4, 0)))
    retain.write_text("".join(json.dumps(r) + "\n" for r in mcq_records(4, 5)))
    before = snapshot(tmp_path)
    capfd.readouterr()  # the fixtures' own output
    code = run_cli(
        "eval",
        model,
        "--forget-mcq",
        forget,
        "--retain-mcq",
        retain,
        "--out",
        model,
        "--overwrite",
        "--permutations",
        1,
        "--cloze",
        "none",
        "--no-progress",
    )
    assert_refused(code, capfd.readouterr().err, f"--out {model} is the model folder DIR")
    assert snapshot(tmp_path) == before


def test_publish_staging_that_holds_the_model_folder_is_refused(tmp_path, capfd, monkeypatch):
    """Case 2: `dsg publish P/model --dry-run P --overwrite` deleted P/model and the rest of P."""
    monkeypatch.setattr(
        pub,
        "verify",
        lambda staged, timeout=None: {"class": "DSGForCausalLM", "seconds": 0, "logits_shape": [1, 1, tiny.VOCAB]},
    )
    parent = tmp_path / "P"
    model = tiny.make_tiny_dsg(parent / "model")
    (parent / "notes.txt").write_text("the rest of P")
    before = snapshot(tmp_path)
    capfd.readouterr()  # the fixtures' own output
    code = run_cli("publish", model, "--repo-id", "me/dsg", "--dry-run", parent, "--overwrite")
    assert_refused(code, capfd.readouterr().err, f"--dry-run {parent} contains the model folder ({model})")
    assert snapshot(tmp_path) == before


def test_build_with_an_empty_out_is_refused(tmp_path, tmp_path_factory, capfd, monkeypatch):
    """Case 3: `dsg build ... --out '' --overwrite` took '' for the current folder and emptied it."""
    from test_build import SEQ_LEN, get_world

    world = get_world(tmp_path_factory)  # real inputs: before the fix the build ran, then replaced the folder
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    (work / "sub").mkdir()
    (work / "sub" / "data.bin").write_bytes(bytes(range(256)))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path, world.base, world.sae_z)
    capfd.readouterr()  # the fixtures' own output
    code = run_cli(
        "build",
        "--base",
        world.base,
        "--sae",
        world.sae_z,
        "--forget",
        *world.forget_sources,
        "--retain",
        *world.retain_sources,
        "--seq-len",
        SEQ_LEN,
        "--batch-size",
        64,
        "--out",
        "",
        "--overwrite",
    )
    assert_refused(code, capfd.readouterr().err, "--out is empty")
    assert snapshot(tmp_path, world.base, world.sae_z) == before
    assert Path.cwd() == work


# ------------------------------------------------------------------------------- the rule, everywhere
def command(name: str, root: Path, out) -> list:
    """argv for `name` on the fixture's inputs, writing `out`, with --overwrite."""
    i = root / "inputs"
    common = {
        "build": [
            "build",
            "--base",
            i / "base",
            "--sae",
            i / "sae",
            "--forget",
            i / "forget.txt",
            "--retain",
            i / "retain.txt",
        ],
        "build --add-to": [
            "build",
            "--add-to",
            i / "dsg",
            "--sae",
            i / "sae",
            "--forget",
            i / "forget.txt",
            "--retain",
            i / "retain.txt",
            "--name",
            "other",
        ],
        "eval": [
            "eval",
            i / "dsg",
            "--forget-mcq",
            i / "forget.jsonl",
            "--retain-mcq",
            i / "retain.jsonl",
            "--no-progress",
        ],
        "eval --baseline": [
            "eval",
            i / "dsg",
            "--forget-mcq",
            i / "forget.jsonl",
            "--retain-mcq",
            i / "retain.jsonl",
            "--baseline",
            f"other={i / 'base'}",
            "--no-progress",
        ],
        "sweep": [
            "sweep",
            "--base",
            i / "base",
            "--sae",
            i / "sae",
            "--forget",
            i / "forget.txt",
            "--retain",
            i / "retain.txt",
            "--forget-mcq",
            i / "forget.jsonl",
            "--retain-mcq",
            i / "retain.jsonl",
        ],
        "rmu": ["rmu", "--base", i / "base", "--forget", i / "forget.txt", "--retain", i / "retain.txt"],
        "train-sae": ["train-sae", "--base", i / "base", "--layer", "1", "--width", "16", "--text", i / "forget.txt"],
        "results": ["results"],
    }
    if name == "publish":
        return ["publish", i / "dsg", "--repo-id", "me/dsg", "--dry-run", out, "--overwrite"]
    return [*common[name], "--out", out, "--overwrite"]


# the folder input each command's output is tested against
MAIN_INPUT = {
    "build": "base",
    "build --add-to": "dsg",
    "eval": "dsg",
    "eval --baseline": "base",
    "sweep": "sae",
    "rmu": "base",
    "train-sae": "base",
    "publish": "dsg",
}
COMMANDS = list(MAIN_INPUT) + ["results"]


def out_for(case: str, root: Path, name: str):
    inp = root / "inputs" / MAIN_INPUT.get(name, "")
    return {
        "out == input": inp,
        "out contains input": inp.parent,
        "out inside input": inp / "report",
        "out == input file": root / "inputs" / "forget.txt",
        "out == cwd": root / "work",
        "out == .": ".",
        "out == ..": "..",
        "out == home": root / "home",
        "out contains home": root,
        "empty": "",
        "root": "/",
        "under a file": root / "work" / "keep.txt" / "out",
        "under /proc": "/proc/dsg-test-out",
        "under /sys": "/sys/dsg-test-out",
    }[case]


EXPECTED = {
    "out == input": ["is the", "write the output to a separate folder"],
    "out contains input": ["contains the", "write the output to a separate folder"],
    "out inside input": ["is inside the", "it must be outside"],
    "out == input file": ["source", "write the output to a separate folder"],
    "out == cwd": ["is the current folder"],
    "out == .": ["--out . is the current folder"],
    "out == ..": ["contains the current folder"],
    "out == home": ["is your home folder"],
    "out contains home": ["contains"],
    "empty": ["is empty"],
    "root": ["is the file-system root"],
    "under a file": ["keep.txt is a file, not a folder"],
    "under /proc": ["is under /proc"],
    "under /sys": ["is under /sys"],
}
INPUT_CASES = ["out == input", "out contains input", "out inside input"]
FILE_INPUT = {"build", "build --add-to", "sweep", "rmu", "train-sae"}  # take forget.txt as an input


def cases():
    for name in COMMANDS:
        for case in EXPECTED:
            if name == "results" and (case in INPUT_CASES or case == "out == input file"):
                continue
            if case == "out == input file" and name not in FILE_INPUT:
                continue
            yield pytest.param(name, case, id=f"{name}: {case}")


@pytest.mark.parametrize("name,case", list(cases()))
def test_overlapping_or_unwritable_outputs_are_refused(place, capfd, name, case):
    out = out_for(case, place, name)
    before = snapshot(place)
    argv = command(name, place, out)
    if name == "publish":
        flag_phrases = [p.replace("--out", "--dry-run") for p in EXPECTED[case]]
    else:
        flag_phrases = EXPECTED[case]
    capfd.readouterr()  # the fixtures' own output
    code = run_cli(*argv)
    assert_refused(code, capfd.readouterr().err, *flag_phrases)
    assert snapshot(place) == before
    assert Path.cwd() == place / "work"


@pytest.mark.parametrize("name", ["build", "eval", "sweep", "rmu", "train-sae", "results"])
def test_an_existing_output_without_overwrite_stays_refused(place, capfd, name):
    out = place / "old"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(place)
    argv = [a for a in command(name, place, out) if a != "--overwrite"]
    capfd.readouterr()
    assert_refused(run_cli(*argv), capfd.readouterr().err, f"output folder {out} already exists (pass --overwrite")
    assert snapshot(place) == before


# ------------------------------------------------------------------------------------ the function
def test_prepare_output_rules(place):
    i = place / "inputs"
    inputs = {"the model folder": i / "dsg", "a source": [i / "forget.txt", "some/hub-id", None]}
    assert prepare_output(place / "new" / "deeper", True, inputs=inputs) == place / "new" / "deeper"
    assert not (place / "new").exists()  # checking creates nothing
    assert prepare_output("rel", False, inputs=inputs) == place / "work" / "rel"
    # the report folder publish reads by default may live inside the model folder when allowed
    assert (
        prepare_output(i / "dsg" / "eval", True, inputs=inputs, nested_ok=[i / "dsg" / "eval"]) == i / "dsg" / "eval"
    )
    with pytest.raises(DSGError, match="is inside the model folder"):
        prepare_output(i / "dsg" / "other", True, inputs=inputs, nested_ok=[i / "dsg" / "eval"])
    # an empty existing folder counts as new where allowed (publish's STAGING)
    (place / "empty").mkdir()
    assert prepare_output(place / "empty", False, empty_ok=True) == place / "empty"
    with pytest.raises(DSGError, match="already exists and is not empty"):
        prepare_output(place / "work" / ".." / "inputs" / "sae", False, kind="staging folder", empty_ok=True)
    # a link to an input is that input
    (place / "link").symlink_to(i / "dsg")
    with pytest.raises(DSGError, match="is the model folder"):
        prepare_output(place / "link", True, inputs=inputs)
    # an existing file, this package's code
    with pytest.raises(DSGError, match="exists and is not a folder"):
        prepare_output(place / "work" / "keep.txt", True)
    import modeling_dsg

    with pytest.raises(DSGError, match="this package's code"):
        prepare_output(Path(modeling_dsg.__file__).parent, True)


def test_prepare_output_refuses_top_level_folders_and_unwritable_places(place, tmp_path):
    with pytest.raises(DSGError, match="top-level system folder"):
        prepare_output("/usr", True)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(DSGError, match="is not writable"):
                prepare_output(locked / "out", True)
        finally:
            locked.chmod(0o700)
