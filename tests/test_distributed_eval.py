"""`dsg eval` over two CPU processes (torchrun, gloo) writes the report one process writes.

The marker world of test_evaluation (a tiny Llama DSG folder whose guardrail "zeta" fires on the letter "z",
forget/retain question files and a text file) is evaluated once in one process (in-process CLI) and once by
`torchrun --standalone --nproc_per_node 2 -m modeling_dsg eval ...` with OMP_NUM_THREADS=1, with every part
that forwards: letters and cloze (every choice), the known filter, text, a baseline, the dilution attack and
fluency generations, in batches of 2 so that the shards interleave and some passes leave a process without a
batch. The two folders must be the same: summary.md and the plots byte for byte, report.json equal except its
timings (which record the process count) and the fluency block's seconds. Only process 0 writes and prints;
an error ends every process with one `dsg: error:` line, also when only one process fails mid-scoring.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tiny
from test_distributed_build import torchrun
from test_evaluation import World, run_cli

from modeling_dsg.evaluation import scoring
from modeling_dsg.evaluation.evaluate import load_dsg


class Runs:
    """The same `dsg eval` in one process and over two."""

    def __init__(self, root, world: World):
        self.world = world
        other = root / "other"
        tiny.tiny_base("llama", seed=1).save_pretrained(other)
        self.args = [
            "eval",
            world.model_dir,
            "--forget-mcq",
            world.forget_file,
            "--retain-mcq",
            world.retain_file,
            "--text",
            world.text_file,
            "--forget-name",
            "biology",
            "--retain-name",
            "general",
            "--permutations",
            4,
            "--batch-size",
            2,
            "--cloze",
            "all",
            "--baseline",
            f"other={other}",
            "--dilution",
            "--fluency",
            3,
            "--fluency-tokens",
            4,
            "--no-progress",
        ]
        self.one = root / "one" / "report"
        result = run_cli(*self.args, "--out", self.one)
        assert result.code == 0, result.err[-4000:]
        (root / "two").mkdir()
        self.two = root / "two" / "report"
        self.two_run = torchrun("-m", "modeling_dsg", *self.args, "--out", self.two, cwd=root)
        assert self.two_run.returncode == 0, self.two_run.stderr[-4000:]
        self.reports = [json.loads((folder / "report.json").read_text()) for folder in (self.one, self.two)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("dsg_distributed_eval"))


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dsg_distributed_eval_runs"), world)


def test_two_processes_write_the_report_one_process_writes(runs):
    one, two = runs.one, runs.two
    files = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == files
    assert "rho_zeta.png" in files and "tradeoff_cloze.png" in files
    for name in files:  # summary.md and the PNGs: byte for byte
        if name != "report.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name

    r1, r2 = runs.reports
    assert r1["results"] == r2["results"] and any(row["dsg"] != row["base"] for row in r1["results"])
    assert all(row["baselines"]["other"] is not None for row in r1["results"] if "known" not in row["dataset"])
    assert r1["trigger_rates"] == r2["trigger_rates"]
    assert r1["trigger_rates"]["biology (forget)"] == {"zeta": {"rate": 4 / 6, "fired": 4, "n": 6}}
    assert r1["trigger_rates_by_subject"] == r2["trigger_rates_by_subject"]
    assert r1["known_filter"] == r2["known_filter"] and r1["known_filter"]["biology (forget)"]["scored_prompts"]
    assert r1["rho"] == r2["rho"] and r1["metrics"] == r2["metrics"]
    assert r1["dilution"] == r2["dilution"] and r1["dilution"]["by_guardrail"]["zeta"]["10x"]["fired_before"] == 4
    f1, f2 = r1.pop("fluency"), r2.pop("fluency")
    f1.pop("seconds"), f2.pop("seconds")
    assert f1 == f2 and f1["sets"]["biology (forget)"]["n"] == 3
    t1, t2 = r1.pop("timings"), r2.pop("timings")
    assert r1 == r2  # everything but the timings
    assert (t1["scoring_processes"], t2["scoring_processes"]) == (1, 2)
    assert set(t1) == set(t2)


def test_only_process_zero_writes_and_prints(runs):
    assert sorted(os.listdir(runs.two.parent)) == ["report"]  # one folder, no temporary folder left beside it
    out = runs.two_run.stdout
    assert out.count(f"wrote {runs.two}") == 1, out
    assert out.count("| biology (forget) |") == runs.one.joinpath("summary.md").read_text().count(
        "| biology (forget) |"
    ), out


def test_a_bad_input_ends_every_process_with_one_line(runs, tmp_path):
    run = torchrun("-m", "modeling_dsg", *runs.args, "--out", runs.two, cwd=tmp_path)  # exists, no --overwrite
    assert run.returncode != 0
    # both processes fail at once: their lines may interleave in the shared stderr, so count the message
    error = f"dsg: error: output folder {runs.two} already exists (pass --overwrite to replace it)"
    assert run.stderr.count("dsg: error:") == run.stderr.count(error) == 2, run.stderr[-4000:]
    assert "/modeling_dsg/" not in run.stderr


SCORE_IN_TWO = """
import numpy as np
from modeling_dsg import distributed
from modeling_dsg.errors import DSGError
from modeling_dsg.evaluation import scoring
from modeling_dsg.evaluation.evaluate import load_dsg

distributed.init("cpu")
model, tok = load_dsg({model_dir!r})
prompts = {prompts!r}
scores, decisions = scoring.letter_logprobs(model, tok, prompts, batch_size=2, record=True, progress=False)
np.savez(
    f"rank{{distributed.rank()}}.npz", scores=scores, rho=decisions["zeta"]["rho"], fired=decisions["zeta"]["fired"]
)

forward = model.forward


def broken(*args, **kwargs):
    if distributed.rank() == 1:
        raise DSGError("broken forward")
    return forward(*args, **kwargs)


model.forward = broken
try:
    scoring.text_nll(model, tok, prompts, batch_size=2, progress=False, desc="text pass")
except DSGError as err:  # a file per process: two processes' prints can interleave on one line
    with open(f"rank{{distributed.rank()}}.txt", "w") as out:
        out.write(str(err))
distributed.close()
"""


def test_every_process_returns_every_row_and_a_failure_fails_all(world, tmp_path):
    """The scoring functions return the whole per-row arrays and decisions in every process, equal to one
    process's; a process that fails mid-scoring does not leave the others waiting: they all raise, naming it."""
    from test_build import mcq_text

    prompts = [mcq_text(r) for r in world.forget + world.retain]  # 11 prompts: 6 batches of 2, 3 per process
    script = tmp_path / "score_in_two.py"
    script.write_text(SCORE_IN_TWO.format(model_dir=str(world.model_dir), prompts=prompts))
    run = torchrun(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    model, tok = load_dsg(world.model_dir)
    scores, decisions = scoring.letter_logprobs(model, tok, prompts, batch_size=2, record=True, progress=False)
    assert decisions["zeta"]["fired"].sum() == 4
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert np.array_equal(got["scores"], scores)
        assert np.array_equal(got["rho"], decisions["zeta"]["rho"])
        assert np.array_equal(got["fired"], decisions["zeta"]["fired"])
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert errors == ["text pass failed in process 1 of 2: broken forward", "broken forward"]
