"""The benchmark script runs (on a tiny model, in seconds) and writes the JSON it promises."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import tiny

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_script(name, args, tmp_path, succeed: bool = True):
    """Run benchmarks/NAME with ARGS offline in tmp_path (remote code cached there); unless told it may fail, fail
    with its stderr when it does."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 or not succeed, proc.stderr[-2000:]
    return proc


def benchmark_module():
    spec = importlib.util.spec_from_file_location("dsg_benchmark", BENCHMARKS / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_medians_interval_is_the_order_statistics_that_binomial_tails_allow():
    """95%: the k-th smallest and k-th largest with the largest k such that P(Binomial(n, 1/2) < k) <= 0.025."""
    median_ci = benchmark_module().median_ci
    values = [float(v) for v in range(20, 0, -1)]  # unsorted on purpose
    assert median_ci(values) == [6.0, 15.0]  # P(B <= 5) = 0.0207, P(B <= 6) = 0.0577 for n = 20
    assert median_ci(values[:7]) == [14.0, 20.0]  # n = 7: min and max (coverage 1 - 2/128)
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # n = 5: even min..max covers only 1 - 2/32
    assert median_ci(values, confidence=0.5) == [8.0, 13.0]  # P(B <= 7) = 0.1316 <= 0.25 < P(B <= 8) = 0.2517


def test_timed_runs_collect_first_and_keep_the_collector_off_inside():
    """A timed run starts from a collected heap with the garbage collector off (as timeit), and turns it back on;
    `collect=False` (--keep-gc) leaves the collector as it was."""
    import gc

    import torch

    timed, cpu = benchmark_module().timed, torch.device("cpu")
    seen = []

    def run():
        seen.append((gc.isenabled(), gc.get_count()[0]))

    assert gc.isenabled()
    gc.collect()
    garbage = [[i] for i in range(500)]  # tracked objects: generation 0 counts them until the next collection
    assert gc.get_count()[0] >= 500  # (below the automatic threshold of 700: none has run yet)
    assert timed(run, cpu) >= 0 and gc.isenabled()
    assert seen[-1][0] is False and seen[-1][1] < 500
    assert timed(run, cpu, collect=False) >= 0 and seen[-1][0] is True and gc.isenabled()
    gc.disable()  # a caller that turned it off itself finds it off afterwards
    try:
        timed(run, cpu)
        assert not gc.isenabled() and seen[-1][0] is False
    finally:
        gc.enable()
    del garbage


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run_script(
        "benchmark.py",
        [
            "--tiny",
            "--lengths",
            "16",
            "--batches",
            "1",
            "2",
            "--new-tokens",
            "4",
            "--rounds",
            "2",
            "--repeats",
            "2",
            "--out",
            str(out),
            "--markdown",
            str(tmp_path / "b.md"),
        ],
        tmp_path,
    )
    report, bench = json.loads(out.read_text()), benchmark_module()
    assert set(report["forward"]) == {"B1xT16", "B2xT16"}
    rounds = [(e, 2) for e in report["forward"].values()] + [
        (e, 3) for e in report["generate"].values()
    ]  # generate: >= 3
    for entry, n in rounds:
        for variant in ("dsg_unfired", "dsg_fired"):
            ratio = entry[variant]["ratio_to_base"]
            assert ratio["n"] == n and ratio["p25"] <= ratio["median"] <= ratio["p75"]
    assert report["generate"]["B1"]["base"]["tokens_per_s"] > 0
    # decoding steps on a cut-back KV cache: the same rounds, each variant's time per step, and the in-call ratio
    assert set(report["decode_step"]) == {"B1", "B2"} and report["steps"] == 10
    for entry in report["decode_step"].values():
        assert entry["dsg_fired"]["ratio_to_base"]["n"] == 2 and entry["base"]["step_ms"] > 0
        assert entry["in_call"]["dsg_fired"]["ratio"]["median"] > 1.0  # the hook runs in each step
    # the reference implementation (full SAE encode/decode, error term added back) is timed beside the guard
    # and applies the same edit: same logits as the DSG model, fired or not
    assert report["reference"] and report["forward"]["B1xT16"]["dsg_vs_reference"]["fired"]["n"] == 2
    for entry in report["forward"].values():
        assert set(entry["reference_max_abs_logit_diff"]) == {"unfired", "fired"}
        assert max(entry["reference_max_abs_logit_diff"].values()) < 1e-3
    assert "reference_fired" in report["generate"]["B2"]
    assert report["storage"]["dsg_slim_bytes"] < report["storage"]["dsg_full_bytes"]
    assert report["load"]["dsg"]["ratio_to_base"]["median"] > 0
    assert report["machine"]["device"] == "cpu"
    cost = report["build_cost"]  # the truncated statistics forward stops after the guarded block 1
    assert cost["layer"] == 1 and cost["n_layers"] == tiny.LAYERS and cost["truncated_speedup"] > 0
    # each round keeps each variant's fastest of --repeats runs; goals apply to 256 and 1,024 tokens and generation
    assert report["repeats"] == 2 and report["rounds"] == 2
    assert [(g["call"], g["variant"]) for g in bench.goals(report)] == [
        (call, variant)
        for call in ("generate B1", "generate B2", "decoding step B1", "decoding step B2")
        for variant in ("dsg_unfired", "dsg_fired")
    ]
    for entry in [*report["generate"].values(), *report["decode_step"].values()]:
        assert 0.0 <= entry["quiet_steps"] <= 1.0
    table = (tmp_path / "b.md").read_text()
    assert "Decoding steps in which no selected feature is active in any row" in table and "generate B2 " in table
    assert "| generate B2 | fired | <= 1.01 |" in table and "too few rounds" in table
    assert "| decoding step B2 | fired | <= 1.01 |" in table and "| decoding step B1 | x" in table
    assert "| B2xT16 |" in table and "| load time DSG / base |" in table and "speed-up over a full forward" in table


def test_the_quiet_share_counts_the_decoding_steps_with_no_active_feature():
    """A guard whose features never fire settles every decoding step with a count (share 1); one whose features
    always fire, none (share 0); the prompt's own call is not a decoding step."""
    import torch

    quiet_share = benchmark_module().quiet_share
    model, _ = tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1)])
    prompt = torch.tensor([[tiny.BOS, 5, 6, 7, 8]])

    def generate():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6)

    shares = []
    for bias in (-1e4, 1e4):  # every pre-activation far below, then far above, the threshold
        with torch.no_grad():
            model.guards[0].sae.b_enc.fill_(bias)
        shares.append(quiet_share(model, generate))
    assert shares == [1.0, 0.0]
    assert quiet_share(model, lambda: model(prompt)) is None


def test_guard_step_in_generation_smoke(tmp_path):
    """`guard_step.py --in-generation` times three variants of the hook inside real generations."""
    folder = tiny.save_tiny_dsg(tmp_path / "tiny-dsg", guardrails=[tiny.guardrail("jumprelu", layer=1)])
    proc = run_script("guard_step.py", ["--model", str(folder), "--in-generation"], tmp_path)
    rows = [line.split() for line in proc.stdout.splitlines() if line.endswith(" us")]
    assert [" ".join(row[:-2]) for row in rows] == [
        "the folder's gate",
        "hook, no tensor work",
        "hook, 40 trivial ops",
    ]
    assert all(float(row[-2]) > 0 for row in rows)


def test_guard_step_compares_two_folders_inside_the_same_generations(tmp_path):
    """`guard_step.py --compare` times two folders' hooks, alternating, and names each."""
    first = tiny.save_tiny_dsg(tmp_path / "one", guardrails=[tiny.guardrail("jumprelu", layer=1)])
    second = tiny.save_tiny_dsg(tmp_path / "two", guardrails=[tiny.guardrail("jumprelu", layer=0)])
    proc = run_script("guard_step.py", ["--model", str(first), "--compare", str(second)], tmp_path)
    rows = [line.split() for line in proc.stdout.splitlines() if line.endswith(" us")]
    assert [row[0] for row in rows] == [str(first), str(second)]
    assert all(float(row[2]) >= float(row[5]) > 0 for row in rows)  # median >= best > 0


def test_guard_step_splits_a_decoding_step_into_its_parts(tmp_path):
    folder = tiny.make_tiny_dsg(tmp_path / "tiny-dsg")
    out = tmp_path / "segments.json"
    proc = run_script(
        "guard_step.py", ["--model", str(folder), "--segments", "--rounds", "20", "--out", str(out)], tmp_path
    )
    report = json.loads(out.read_text())
    parts = {row["part"]: row for row in report["parts"]}
    assert list(parts) == [
        "DSG wrapper, before the base",
        "embeddings and masks",
        "blocks 0-1",
        "the guard's hook",
        f"blocks 2-{tiny.LAYERS - 1}",
        "norm and head",
        "DSG wrapper, after the base",
    ]
    hook = parts["the guard's hook"]  # the base has no guard: its part is two timestamps apart
    assert hook["dsg_us"] > 5 * hook["base_us"] and hook["difference_us"] > 0
    assert report["rounds"] == 20 and report["step_us"]["dsg"] > 0 and "whole step" in proc.stdout


def test_guard_step_segments_pairs_the_steps_unfired_and_fired(tmp_path):
    """`--segments` gives the whole step's DSG/base ratio with a 95% interval over the paired steps; `--fired` sets
    every threshold to 0 first, so that the rows fire (a threshold of 1 never fires the fraction score)."""
    folder = tiny.save_tiny_dsg(tmp_path / "tiny-dsg", guardrails=[tiny.guardrail("jumprelu", threshold=1.0)])
    reports = []
    for extra in ([], ["--fired"]):
        out = tmp_path / f"segments{len(extra)}.json"
        args = ["--model", str(folder), "--segments", "--batch", "3", "--rounds", "20", "--out", str(out), *extra]
        proc = run_script("guard_step.py", args, tmp_path)
        reports.append(json.loads(out.read_text()))
        assert "DSG / base per whole step" in proc.stdout
    unfired, fired = reports
    assert (unfired["fired"], unfired["fired_rows"]) == (False, 0)
    assert (fired["fired"], fired["fired_rows"]) == (True, 3)
    for report in reports:
        low, high = report["ratio_ci95"]
        assert 0 < low <= report["ratio"] <= high


def test_guard_step_segments_compare_two_versions_of_the_code_on_the_same_weights(tmp_path):
    """`--segments --compare OTHER` alternates the base and two folders step by step: a version whose hook sleeps
    2 ms shows as 2 ms slower in the hook and in the whole step, with a 95% interval wholly below 0; a
    folder with other guardrails is refused with one message."""
    import shutil

    folder = tiny.make_tiny_dsg(tmp_path / "tiny-dsg")
    slower = Path(shutil.copytree(folder, tmp_path / "slower"))
    code = (slower / "guard_dsg.py").read_text()
    hook = "    def hook(self, module, args, output):\n"
    assert code.count(hook) == 1
    code = code.replace(hook, hook + "        __import__('time').sleep(0.002)\n")
    (slower / "guard_dsg.py").write_text(code)
    out = tmp_path / "segments.json"
    args = ["--model", str(folder), "--segments", "--compare", str(slower), "--rounds", "20", "--out", str(out)]
    proc = run_script("guard_step.py", args, tmp_path)
    report = json.loads(out.read_text())
    parts = {row["part"]: row for row in report["parts"]}
    assert parts["the guard's hook"]["dsg_minus_other_us"] < -1500  # the slower version's hook: 2 ms more
    assert abs(parts["DSG wrapper, before the base"]["dsg_minus_other_us"]) < 1500  # the same code elsewhere
    assert report["dsg_minus_other_us"] < -1500 and report["dsg_minus_other_ci95"][1] < 0
    assert report["other"] == str(slower) and report["step_us"]["other"] > report["step_us"]["dsg"]
    assert "DSG - OTHER per whole step" in proc.stdout
    other_gate = tiny.save_tiny_dsg(tmp_path / "two", guardrails=[tiny.guardrail("jumprelu", layer=0)])
    args = ["--model", str(folder), "--segments", "--compare", str(other_gate), "--rounds", "2"]
    refused = run_script("guard_step.py", args, tmp_path, succeed=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"--compare {other_gate}:" in refused.stderr


def test_guard_step_times_a_token_points_gate(tmp_path):
    """`guard_step.py` on a folder whose gate scores token points: the simpler gates drop the points with the
    weights, and the same learned gate scoring flags is timed beside it."""
    g = tiny.guardrail("jumprelu", layer=1)
    g.update(score="window", window=6, token_weights=[3, -2, 1, 2, 0], token_threshold=2, token_value="points")
    folder = tiny.save_tiny_dsg(tmp_path / "tiny-dsg", guardrails=[g])
    proc = run_script("guard_step.py", ["--model", str(folder), "--steps", "20"], tmp_path)
    rows = [line.split() for line in proc.stdout.splitlines() if line.endswith(" us")]
    assert [" ".join(row[:-2]) for row in rows] == [
        "fraction, any feature",
        "window, any feature",
        "learned gate, flags",
        "the folder's gate",
    ]
    assert all(float(row[-2]) > 0 for row in rows)


def test_the_cost_goals_are_read_from_the_right_cells():
    """256 tokens: <= 1.01; 1,024: <= 1.005; other lengths have none; generation <= 1.01. A goal is shown only
    when the top of the median's 95% interval meets it, and met by the median alone otherwise."""
    goals = benchmark_module().goals

    def cell(median, ci, in_call=1.001):
        q = {"median": median, "median_ci95": ci}
        return {
            "dsg_unfired": {"ratio_to_base": q},
            "dsg_fired": {"ratio_to_base": q},
            "in_call": {v: {"ratio": {"median": in_call}} for v in ("dsg_unfired", "dsg_fired")},
        }

    report = {
        "forward": {
            "B1xT256": cell(1.008, [0.99, 1.02]),
            "B1xT512": cell(1.5, [1.4, 1.6]),
            "B1xT1024": cell(1.004, [1.0, 1.005]),
        },
        "generate": {"B8": cell(1.011, None, in_call=1.02)},
    }
    rows = {(g["call"], g["variant"]): g for g in goals(report)}
    assert {call for call, _ in rows} == {"forward B1xT256", "forward B1xT1024", "generate B8"}
    t256, t1024, gen = (rows[c, "dsg_fired"] for c in ("forward B1xT256", "forward B1xT1024", "generate B8"))
    assert (t256["goal"], t256["median_meets"], t256["shown"]) == (1.01, True, False)
    assert (t1024["goal"], t1024["median_meets"], t1024["shown"]) == (1.005, True, True)
    assert (gen["goal"], gen["median_meets"], gen["shown"], gen["in_call_meets"]) == (1.01, False, False, False)
