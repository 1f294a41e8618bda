"""`dsg build` over two CPU processes (torchrun, gloo) builds what one process builds.

A tiny world (a tiny random Llama, a marker SAE whose detectors fire on "z", forget/retain text files; see
test_build.py) is built once in one process (in-process CLI) and once by
`torchrun --standalone --nproc_per_node 2 -m modeling_dsg build ...` with OMP_NUM_THREADS=1. The two folders
must be the same build: every file byte for byte, except dsg_build.json, which differs only in its timings
(and records the process count there). The same holds for `--add-to`. Only process 0 writes and prints; an
error ends every process with one `dsg: error:` line, also when only one process fails.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from test_build import CLAMP, DETECT_Z, cli, layer_hidden, marker_sae, words

from modeling_dsg.errors import DSGError

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 32
BATCH = 4  # small batches: each row set has several, an odd number of them in some, so the shards interleave


def children_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(*argv, processes: int = 2, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGV...` (a free port on this machine)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run(
        command + [str(a) for a in argv], env=children_env(), cwd=cwd, capture_output=True, text=True, timeout=300
    )


class World:
    def __init__(self, root: Path):
        rng = random.Random(0)
        base, tok = tiny.tiny_base("llama"), tiny.tiny_tokenizer()
        self.base = root / "base"
        base.save_pretrained(self.base)
        tok.save_pretrained(self.base)
        forget = [words(rng, 25, "z") for _ in range(12)]
        retain = []
        for i in range(30):
            text = words(rng, 25)
            if i % 2 == 0:  # a single marker in half the retain documents: tau is not trivially zero
                split = text.split(" ")
                k = rng.randrange(len(split))
                split[k] = "z" + split[k]
                text = " ".join(split)
            retain.append(text)
        self.forget, self.retain = root / "forget.txt", root / "retain.txt"
        self.forget.write_text("\n\n".join(forget) + "\n")
        self.retain.write_text("\n\n".join(retain) + "\n")
        hidden, ids = layer_hidden(base, tok, forget[::3] + retain[::3])
        self.sae = root / "sae"
        marker_sae(self.sae, hidden[1], ids, tok.convert_tokens_to_ids("z"), 1, DETECT_Z)

        self.args = [
            "build",
            "--base",
            self.base,
            "--sae",
            self.sae,
            "--forget",
            self.forget,
            "--retain",
            self.retain,
            "--name",
            "zeta",
            "--seq-len",
            SEQ_LEN,
            "--clamp",
            CLAMP,
            "--batch-size",
            BATCH,
        ]
        self.one = root / "one" / "out"
        assert cli(*self.args, "--out", self.one) == 0
        (root / "two").mkdir()
        self.two = root / "two" / "out"
        self.two_run = torchrun("-m", "modeling_dsg", *self.args, "--out", self.two, cwd=root)
        assert self.two_run.returncode == 0, self.two_run.stderr[-4000:]

    def record(self, folder: Path, name: str) -> dict:
        return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("dsg_distributed"))


def test_two_processes_build_what_one_builds(world):
    one, two = world.one, world.two
    files = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == files
    for name in files:  # weights, config, tokenizer, features.json: byte for byte
        if name != "dsg_build.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name

    [g1], [g2] = world.record(one, "config.json")["guardrails"], world.record(two, "config.json")["guardrails"]
    assert g1 == g2
    assert g1["score"] == "features" and g1["features"] == sorted(DETECT_Z)  # the default gate keeps the detectors
    assert world.record(one, "features.json") == world.record(two, "features.json")

    [b1], [b2] = world.record(one, "dsg_build.json")["guardrails"], world.record(two, "dsg_build.json")["guardrails"]
    assert abs(b1["tau"] - b2["tau"]) <= 1e-6 and b1["tau"] == b2["tau"] and b1["tau"] > 0
    assert b1["heldout"] == b2["heldout"] and b1["heldout"]["forget_trigger_rate"] is not None
    assert b1["tokens"] == b2["tokens"] and b1["rho"] == b2["rho"] and b1["calibration"] == b2["calibration"]
    t1, t2 = b1.pop("timings"), b2.pop("timings")
    assert b1 == b2  # everything but the timings
    assert (t1["statistics_processes"], t2["statistics_processes"]) == (1, 2)
    assert t1["statistics_tokens"] == t2["statistics_tokens"]


def test_only_process_zero_writes_and_prints(world):
    assert sorted(os.listdir(world.two.parent)) == ["out"]  # one folder, no temporary folder left beside it
    out = world.two_run.stdout
    assert out.count(f"wrote {world.two}") == 1, out
    assert out.count("guardrail 'zeta'") == 1, out


def test_add_to_over_two_processes_stacks_what_one_process_stacks(world, tmp_path):
    """--add-to: the pass runs through the existing DSG model (its guardrails active) in each process."""
    args = [a for a in world.args if a not in ("--base", world.base)]
    args = [
        *args[: args.index("--name")],
        "--name",
        "zeta2",
        "--ratio-percentile",
        90,
        *args[args.index("zeta") + 1 :],
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(*args, "--add-to", world.one, "--out", one) == 0
    run = torchrun("-m", "modeling_dsg", *args, "--add-to", world.one, "--out", two, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert world.record(one, "config.json")["guardrails"] == world.record(two, "config.json")["guardrails"]
    assert (one / "features.json").read_bytes() == (two / "features.json").read_bytes()
    records = [world.record(folder, "dsg_build.json")["guardrails"] for folder in (one, two)]
    for record in records:
        assert [g["name"] for g in record] == ["zeta", "zeta2"]
        record[1].pop("timings")
    assert records[0] == records[1]


def test_an_error_ends_every_process_with_one_line(world, tmp_path):
    out = tmp_path / "out"
    run = torchrun("-m", "modeling_dsg", *world.args, "--n-features", 1000, "--out", out, cwd=tmp_path)
    assert run.returncode != 0
    # both processes fail at once: their lines may interleave in the shared stderr, so count the message
    error = "dsg: error: --n-features 1000 is more than the SAE has features (d_sae = 64); pass at most 64"
    assert run.stderr.count("dsg: error:") == run.stderr.count(error) == 2, run.stderr[-4000:]
    assert "/modeling_dsg/" not in run.stderr  # no traceback through our code (torchrun prints its own summary)
    assert not out.exists()


FAIL_IN_ONE = """
import torch
from modeling_dsg import distributed
from modeling_dsg.analysis.stats import collect
from modeling_dsg.data.rows import Rows
from modeling_dsg.errors import DSGError
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({base!r}).eval()
torch.manual_seed(0)
ids = torch.randint(3, 200, (10, 8))
w = torch.randn(32, 16)


def encode(hidden):
    if distributed.rank() == 1:
        raise DSGError("broken encoder")
    return torch.relu(hidden @ w)


try:
    collect(model, 1, encode, Rows(ids, torch.ones_like(ids)), batch_size=3, desc="pass")
except DSGError as err:  # one file per process: two processes' prints can share a line of stdout
    with open(f"rank{{distributed.rank()}}.txt", "w") as f:
        f.write(f"rank {{distributed.rank()}}: {{err}}")
distributed.close()
"""


def test_a_failure_in_one_process_fails_the_pass_in_all(world, tmp_path):
    """A process that fails mid-pass does not leave the others waiting: they all raise, naming it."""
    script = tmp_path / "fail_in_one.py"
    script.write_text(FAIL_IN_ONE.format(base=str(world.base)))
    run = torchrun(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert lines == ["rank 0: pass failed in process 1 of 2: broken encoder", "rank 1: broken encoder"]


CLOSE_FREES_THE_GROUP = """
import gc
import weakref

import torch.distributed as dist
from modeling_dsg import distributed

distributed.init("cpu")
group = weakref.ref(dist.group.WORLD)
from transformers import AutoModelForCausalLM  # loading a model after the group exists, as `dsg eval` does
import evaluate  # noqa: F401  (imports the same torch modules)

model = AutoModelForCausalLM.from_pretrained({base!r})
gathered = distributed.all_gather_object(distributed.rank())
distributed.close()
gc.collect()
with open(f"rank{{distributed.rank()}}.txt", "w") as f:
    f.write(f"{{gathered}} {{'alive' if group() is not None else 'freed'}}")
"""


def test_close_frees_the_group_when_models_load_after_init(world, tmp_path):
    """`close()` frees the process group even when modules imported after `init` (transformers' model loading,
    `evaluate`) look at it: its gloo threads must end before Python shuts down, or a thread freeing the last
    collective's tensors during shutdown aborts the process (rarely: a race at exit)."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_FREES_THE_GROUP.format(base=str(world.base)))
    run = torchrun(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["[0, 1] freed"] * 2


def test_commands_that_run_in_one_process_refuse_several(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli("explain", world.one, "hello") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "dsg: error: dsg explain runs in one process, but this was launched as 2 (WORLD_SIZE); only dsg build "
        "and dsg eval can run over several processes"
    )
    from modeling_dsg.pipelines.sweep import run_sweep

    with pytest.raises(DSGError, match="dsg sweep runs in one process"):
        run_sweep(str(world.base), str(world.sae), [], [], "", "", tmp_path / "sweep")
