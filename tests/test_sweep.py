"""`dsg sweep` on the marker world of test_build (a tiny Llama whose SAE has exact "z" detectors).

What must hold: one statistics pass for the whole grid; every grid point's scores equal a plain
evaluation of the model that `dsg build` would make with those settings (the sweep only re-scores the
questions the guardrail fires on, and must lose nothing by it); the paper's rule picks the lowest
forget score among the points that keep retain >= 99% of base; --save-best writes that model.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
from test_build import CLAMP, SEQ_LEN, get_world, words

from modeling_dsg.errors import DSGError
from modeling_dsg.pipelines import sweep

GRID = dict(modes=("dynamic", "static"), n_features=(1, 2, 4), clamps=(CLAMP, 8.0), ratio_percentiles=(90.0, 97.0))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def questions(world):
    rng = random.Random(5)
    forget = [
        {"question": words(rng, 8, "z"), "choices": [words(rng, 2, "z") for _ in range(4)], "answer": i % 4}
        for i in range(6)
    ]
    forget += [{"question": words(rng, 8), "choices": [words(rng, 2) for _ in range(4)], "answer": 1}]  # never fires
    retain = [
        {"question": words(rng, 8), "choices": [words(rng, 2) for _ in range(4)], "answer": i % 4} for i in range(6)
    ]
    retain[0]["question"] = words(rng, 30) + " zinc"  # one marker in a long question: fires only at a low tau
    paths = {}
    for name, records in (("forget", forget), ("retain", retain)):
        paths[name] = world.root / f"sweep_{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


@pytest.fixture(scope="module")
def swept(world, questions, tmp_path_factory, monkeypatch_module):
    from modeling_dsg.analysis import stats

    calls = []
    original = stats.collect
    monkeypatch_module.setattr(stats, "collect", lambda *a, **k: calls.append(k.get("desc")) or original(*a, **k))
    out = tmp_path_factory.mktemp("sweep") / "report"
    best = out.parent / "best"
    options = options_for(**GRID)
    result = run_on(world, questions, out, options, save_best=best)
    return {"result": result, "out": out, "best": best, "calls": calls, "options": options}


def options_for(**grid):
    """The sweep options of these tests: the grid given, scored by choice_prob, the tiny world's build."""
    from modeling_dsg.pipelines.build import BuildOptions

    return sweep.SweepOptions(
        **grid,
        metric="choice_prob",
        limit=None,
        batch_size=4,
        progress=False,
        # the tiny world's packed rows, and the window score (its features and token gate are what these tests read)
        build=BuildOptions(name="zeta", seq_len=SEQ_LEN, packing=True, batch_size=64, score="window"),
    )


def run_on(world, questions, out, options, **kwargs) -> dict:
    """`run_sweep` on the tiny world's model, SAE and corpora and the question files."""
    return sweep.run_sweep(
        str(world.base),
        str(world.sae_z),
        world.forget_sources,
        world.retain_sources,
        str(questions["forget"]),
        str(questions["retain"]),
        out,
        options=options,
        **kwargs,
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_one_statistics_pass_serves_the_grid(swept):
    result = swept["result"]
    n_points = len(GRID["ratio_percentiles"]) * 3 * 2 + 3 * 2
    assert len(result["points"]) == n_points
    # 4 corpora for selection and calibration (forget, retain and their held-out splits) + the letter
    # inputs of each question set: nothing per grid point
    assert len(swept["calls"]) == 4 + 2, swept["calls"]
    assert all("error" not in p for p in result["points"])
    assert sum(p["decision_mismatches"] for p in result["points"] for p in (p["forget"], p["retain"])) == 0


def _full_score(world, questions, point, options):
    """The plain path: build the guardrail with the point's settings, evaluate every question."""
    from modeling_dsg.data.mcq import load_mcq
    from modeling_dsg.data.sources import load_base_model, load_sae, load_texts
    from modeling_dsg.evaluation.evaluate import EvalOptions
    from modeling_dsg.evaluation.scoring import score_mcq
    from modeling_dsg.pipelines.build import assemble, build_guardrail

    bo = dataclasses.replace(
        options.build,
        mode=point["mode"],
        n_features=point["n_features"],
        clamp=point["clamp"],
        ratio_percentile=point["ratio_percentile"] or options.build.ratio_percentile,
        token_gate=None,  # as `dsg build --mode M` resolves it: learned when dynamic, any when static
    )
    base, tok = load_base_model(str(world.base))

    def texts(sources):
        return [t for source in sources for t in load_texts(source)]

    built = build_guardrail(
        base,
        tok,
        load_sae(str(world.sae_z)),
        texts(world.forget_sources),
        texts(world.retain_sources),
        bo,
        sae_layer=1,
    )
    assert built.guardrail["features"] == point["features"] and built.guardrail["threshold"] == point["tau"]
    model = assemble(base, tok, [built])
    eo = EvalOptions(cloze="none", known_filter=False, batch_size=1, progress=False)
    scores = {}
    for role in ("forget", "retain"):
        mcq = load_mcq(str(questions[role]), role)
        scored = score_mcq(model, tok, mcq, eo, record=True)
        scores[role] = (
            sweep.set_score("choice_prob", scored, mcq.answers),
            float(next(iter(scored["decisions"].values()))["fired"].mean()),
        )
    return scores


@pytest.mark.parametrize("which", [0, 5, -1])
def test_grid_points_equal_a_plain_evaluation(world, questions, swept, which):
    point = swept["result"]["points"][which]
    full = _full_score(world, questions, point, swept["options"])
    for role in ("forget", "retain"):
        assert point[role]["score"] == pytest.approx(full[role][0], abs=1e-7)  # the edit moves it by ~1e-4
        assert point[role]["trigger_rate"] == full[role][1]


def test_the_grid_changes_what_is_forgotten(swept):
    result = swept["result"]
    base = result["base"]
    dynamic = [p for p in result["points"] if p["mode"] == "dynamic"]
    # the marker questions fire, so the forget score moves (a random tiny model's letter distribution is
    # nearly uniform, so it moves by 1e-5 to 1e-4); the marker-free forget question and the retain set stay the base's
    assert all(p["forget"]["trigger_rate"] == pytest.approx(6 / 7) for p in dynamic)
    assert all(abs(p["forget"]["score"] - base["forget"]) > 1e-6 for p in dynamic)
    by_setting = {}
    for p in dynamic:  # the clamp matters at every (ratio, N)
        by_setting.setdefault((p["ratio_percentile"], p["n_features"]), set()).add(round(p["forget"]["score"], 8))
    assert all(len(scores) == len(GRID["clamps"]) for scores in by_setting.values())
    assert all(p["retain"]["score"] == base["retain"] for p in dynamic if p["retain"]["trigger_rate"] == 0)


def test_the_paper_rule_picks_the_chosen_points(swept):
    result = swept["result"]
    floor = 0.99 * result["base"]["retain"]
    for mode in ("dynamic", "static"):
        pts = [p for p in result["points"] if p["mode"] == mode and p["retain"]["score"] >= floor - 1e-12]
        chosen = result["chosen"][mode]
        assert chosen is not None and chosen["forget"]["score"] == min(p["forget"]["score"] for p in pts)
    overall = result["chosen"]["overall"]
    assert overall["forget"]["score"] == min(result["chosen"][m]["forget"]["score"] for m in ("dynamic", "static"))


def test_choose_and_frontier_by_hand():
    def pt(forget, retain, n=1, c=1.0, rate=0.0):
        return {
            "forget": {"score": forget},
            "retain": {"score": retain, "trigger_rate": rate},
            "n_features": n,
            "clamp": c,
        }

    a, b, c, d = pt(0.30, 1.00), pt(0.10, 0.985), pt(0.20, 0.995, n=2), pt(0.20, 0.995, n=1)
    assert (
        sweep.choose([a, b, c, d], base_retain=1.0, floor=0.99) is d
    )  # b breaks the floor; c and d tie, fewer N wins
    assert sweep.choose([b], base_retain=1.0, floor=0.99) is None
    assert sweep.frontier([a, b, c, d]) == [b, c, d, a]  # c and d tie: neither beats the other
    assert sweep.frontier([a, pt(0.4, 0.9)]) == [a]


def test_outputs_and_save_best(world, swept):
    out, best = swept["out"], swept["best"]
    written = json.loads((out / "sweep.json").read_text())
    assert written["chosen"]["overall"]["features"] == swept["result"]["chosen"]["overall"]["features"]
    assert (out / "tradeoff.png").stat().st_size > 5000
    summary = (out / "summary.md").read_text()
    assert "| overall |" in summary and "tradeoff.png" in summary
    chosen = swept["result"]["chosen"]["overall"]
    config = json.loads((best / "config.json").read_text())
    (g,) = config["guardrails"]
    assert (g["mode"], g["features"], g["clamp"], g["threshold"]) == (
        chosen["mode"],
        chosen["features"],
        chosen["clamp"],
        chosen["tau"],
    )
    model = world.load(best)
    assert model.guards[0].features == chosen["features"]


def test_sweep_cli_and_bad_inputs(world, questions, tmp_path, capsys):
    from test_build import cli

    common = [
        "sweep",
        "--base",
        world.base,
        "--sae",
        world.sae_z,
        "--forget",
        *world.forget_sources,
        "--retain",
        *world.retain_sources,
        "--forget-mcq",
        questions["forget"],
        "--retain-mcq",
        questions["retain"],
        "--seq-len",
        SEQ_LEN,
        *("--packing", "--score", "window"),  # the tiny world's packed rows, and the window score
        "--batch-size",
        64,
    ]
    out = tmp_path / "cli"
    assert (
        cli(
            *common,
            "--out",
            out,
            "--modes",
            "dynamic",
            "--n-features-grid",
            2,
            "--clamps",
            4,
            "--ratio-percentiles",
            95,
            "--metric",
            "accuracy",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "| dynamic | dynamic | 2 | 4 |" in printed
        and json.loads((out / "sweep.json").read_text())["metric"] == "accuracy"
    )
    cloze = tmp_path / "cloze"
    assert (
        cli(
            *common,
            "--out",
            cloze,
            "--modes",
            "dynamic",
            "static",
            "--n-features-grid",
            2,
            "--clamps",
            4,
            "--ratio-percentiles",
            95,
            "--metric",
            "cloze_prob",
        )
        == 0
    )
    capsys.readouterr()
    result = json.loads((cloze / "sweep.json").read_text())
    assert 0 < result["base"]["forget"] < 1 and len(result["points"]) == 2
    for p in result["points"]:  # the cloze inputs alone are scored, and the guard agrees with the prediction
        assert p["forget"]["decision_mismatches"] == 0 and p["forget"]["rescored"] >= 6
    for extra, message in [
        (["--clamps", "-1"], "--clamps"),
        (["--retain-floor", "0"], "--retain-floor"),
        (["--limit", "0"], "--limit"),
        (["--n-features-grid", "0"], "--n-features"),
    ]:
        target = tmp_path / f"bad{len(message)}{extra[1]}"
        assert cli(*common, "--out", target, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not target.exists()
    assert cli(*common, "--out", out) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def test_options_are_checked_before_anything_loads():
    with pytest.raises(DSGError, match="--metric"):
        sweep.SweepOptions(metric="f1").validate()
    with pytest.raises(DSGError, match="--modes"):
        sweep.SweepOptions(modes=("gradient",)).validate()
    assert len(sweep.SweepOptions(modes=("static",), n_features=(1, 2), clamps=(1.0,)).grid()) == 2
    assert np.isclose(
        sweep.set_score(
            "cloze_prob",
            {"cloze_correct": np.log([0.25, 0.5]) * 2, "cloze_correct_tokens": np.array([2.0, 2.0])},
            None,
        ),
        0.375,
    )


def test_gate_axes_sweep_score_window_and_calibration(world, questions, tmp_path):
    """The gate's axes (score, window, tau's rule: percentile or target FPR) multiply the dynamic grid; every
    point is scored through the DSG model with exactly that gate (no decision mismatch), and the rules order
    tau and the retain firing rate as they must."""
    from modeling_dsg.pipelines.build import BuildOptions

    options = options_for(
        modes=("dynamic", "static"),
        n_features=(2,),
        clamps=(CLAMP,),
        ratio_percentiles=(90.0,),
        scores=("fraction", "window", "features"),
        windows=(4, 8),
        threshold_percentiles=(50.0, 95.0),
        target_fprs=(0.3,),
    )
    result = run_on(world, questions, tmp_path / "gates", options)
    points = result["points"]
    dynamic = [p for p in points if p["mode"] == "dynamic"]
    gates = {(p["score"], p["window"], p["rule"], p["rule_value"]) for p in dynamic}
    window = BuildOptions().window
    assert gates == {
        (score, w, rule, value)
        for score, w in (("fraction", window), ("window", 4), ("window", 8), ("features", 4), ("features", 8))
        for rule, value in (("percentile", 50.0), ("percentile", 95.0), ("target_fpr", 0.3))
    }
    assert len(points) == 15 + 1 and [p["rule"] for p in points if p["mode"] == "static"] == ["static"]
    assert all("error" not in p for p in points)
    assert sum(p[role]["decision_mismatches"] for p in points for role in ("forget", "retain")) == 0
    by_gate = {(p["score"], p["window"], p["rule"], p["rule_value"]): p for p in dynamic}
    for score, w in (("fraction", window), ("window", 4), ("window", 8), ("features", 4), ("features", 8)):
        low, high = by_gate[(score, w, "percentile", 50.0)], by_gate[(score, w, "percentile", 95.0)]
        assert low["tau"] <= high["tau"]
        assert low["calibration"]["retain_fpr"] >= high["calibration"]["retain_fpr"]
        fpr = by_gate[(score, w, "target_fpr", 0.3)]["calibration"]
        assert fpr["rule"] == "target_fpr" and fpr["retain_fpr_upper95"] <= 0.3
    summary = (tmp_path / "gates" / sweep.SUMMARY_FILE).read_text()
    assert "| window 4, P50 |" in summary and "| fraction, FPR bound 0.3 |" in summary
    assert "| features 8, FPR bound 0.3 |" in summary
    assert all(len(p["token_weights"]) == len(p["features"]) for p in dynamic if p["score"] == "features")


def test_gate_axes_are_checked():
    for bad, flag in (
        (dict(scores=("entropy",)), "--scores"),
        (dict(windows=(1,)), "--windows"),
        (dict(threshold_percentiles=(101.0,)), "--threshold-percentiles"),
        (dict(target_fprs=(0.0,)), "--target-fprs"),
    ):
        with pytest.raises(DSGError, match=flag):
            sweep.SweepOptions(**bad).validate()


# ------------------------------------------------------------------------------------ fluency
# a clamp of 1000 changes the tiny model's greedy answers on fired prompts (static points by 0.03 to 0.06 nats per
# token over the base's own), so a bound of 0.02 nats is a floor that changes the static choice
FLUENCY_GRID = dict(modes=("dynamic", "static"), n_features=(1, 2), clamps=(CLAMP, 1000.0), ratio_percentiles=(90.0,))
FLUENCY = dict(fluency=2, fluency_tokens=4, nll_bound=0.02)


@pytest.fixture(scope="module")
def fluent(world, questions, tmp_path_factory):
    """A small grid with --fluency 2 --fluency-tokens 4 --nll-bound 0.02, counting the greedy generations."""
    from modeling_dsg.evaluation import fluency

    generations = []
    original = fluency.greedy_generate
    out = tmp_path_factory.mktemp("fluency") / "report"
    options = options_for(**FLUENCY_GRID, **FLUENCY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fluency, "greedy_generate", lambda *a, **k: generations.append(len(a[2])) or original(*a, **k))
        result = run_on(world, questions, out, options)
    return {"result": result, "out": out, "options": options, "generations": generations}


def test_fluency_is_measured_at_every_point(fluent):
    result = fluent["result"]
    points = result["points"]
    assert len(points) == 2 * 2 + 2 * 2 and all("error" not in p for p in points)
    for p in points:
        f = p["fluency"]
        # every marker question fires at every point (the 7th, marker-free, never does): the first F are kept
        assert round(p["forget"]["trigger_rate"] * 7) == 6
        assert f["n_fired"] == min(FLUENCY["fluency"], 6) and f["scanned"] == f["n_fired"]
        assert f["nll_added"] == pytest.approx(f["nll_per_token"] - f["base_nll_per_token"], abs=1e-12)
        assert 0 <= f["answer_leak_rate"] <= 1 and f["example"]["answer"] and "fired" in f["example"]
    # the same fired prompts at every point: one base NLL, and the base answers are generated once for the grid
    assert len({p["fluency"]["base_nll_per_token"] for p in points}) == 1
    assert result["fluency"]["base_nll_per_token"] == points[0]["fluency"]["base_nll_per_token"]
    assert result["fluency"]["base_nll_shared"] is True
    assert fluent["generations"] == [2, 2] + [2, 2] * len(points)  # base forget and retain, then DSG per point
    assert result["fluency"] == {
        "n": 2,
        "max_new_tokens": 4,
        "nll_bound": 0.02,
        "chat": False,
        "base_nll_per_token": points[0]["fluency"]["base_nll_per_token"],
        "base_nll_shared": True,
    }
    assert result["timings"]["fluency_s"] > 0


def _built_model(world, point, options):
    """The DSG model `dsg build` makes with a grid point's settings."""
    from modeling_dsg.data.sources import load_base_model, load_sae, load_texts
    from modeling_dsg.pipelines.build import assemble, build_guardrail

    bo = dataclasses.replace(
        options.build,
        mode=point["mode"],
        n_features=point["n_features"],
        clamp=point["clamp"],
        ratio_percentile=point["ratio_percentile"] or options.build.ratio_percentile,
        token_gate=None,  # as `dsg build --mode M` resolves it: learned when dynamic, any when static
    )
    base, tok = load_base_model(str(world.base))
    built = build_guardrail(
        base,
        tok,
        load_sae(str(world.sae_z)),
        [t for source in world.forget_sources for t in load_texts(source)],
        [t for source in world.retain_sources for t in load_texts(source)],
        bo,
        sae_layer=1,
    )
    assert built.guardrail["features"] == point["features"] and built.guardrail["threshold"] == point["tau"]
    return assemble(base, tok, [built]), tok


@pytest.mark.parametrize("which", [0, 3, 5])  # dynamic N1 c2, dynamic N2 c1000, static N1 c1000
def test_fluency_of_a_point_equals_a_direct_measurement(world, questions, fluent, which):
    from modeling_dsg.data.mcq import load_mcq
    from modeling_dsg.evaluation.fluency import measure_fluency

    point = fluent["result"]["points"][which]
    model, tok = _built_model(world, point, fluent["options"])
    direct = measure_fluency(
        model,
        tok,
        load_mcq(str(questions["forget"]), "forget").records,
        load_mcq(str(questions["retain"]), "retain").records,
        FLUENCY["fluency"],
        max_new_tokens=FLUENCY["fluency_tokens"],
        chat=False,
        batch_size=fluent["options"].batch_size,
        n_examples=1,
    )
    assert direct["sets"]["forget"]["dsg"]["nll_per_token"] == point["fluency"]["nll_per_token"]
    assert sweep.fluency_summary(direct) == point["fluency"]


def test_the_rule_with_the_fluency_floor(fluent):
    result = fluent["result"]
    floor = 0.99 * result["base"]["retain"]
    bound = fluent["options"].nll_bound
    for mode in ("dynamic", "static"):
        pts = [p for p in result["points"] if p["mode"] == mode and p["retain"]["score"] >= floor - 1e-12]
        unfloored = result["chosen_without_fluency_floor"][mode]
        assert unfloored["forget"]["score"] == min(p["forget"]["score"] for p in pts)
        pts = [p for p in pts if p["fluency"]["nll_added"] <= bound + 1e-12]
        chosen = result["chosen"][mode]
        if pts:
            assert chosen["forget"]["score"] == min(p["forget"]["score"] for p in pts)
        else:
            assert chosen is None
    # the floor changes the static choice in this world: the lowest static forget score garbles its answers
    without = result["chosen_without_fluency_floor"]
    assert without["static"]["fluency"]["nll_added"] > bound >= result["chosen"]["static"]["fluency"]["nll_added"]
    assert without["static"]["forget"]["score"] < result["chosen"]["static"]["forget"]["score"]
    assert without["overall"] is without["static"] and result["chosen"]["overall"] is not without["overall"]
    # a bound below every point's added NLL leaves nothing; one above all of them is the rule without the floor
    added = [p["fluency"]["nll_added"] for p in result["points"]]
    base_retain = result["base"]["retain"]
    assert sweep.choose(result["points"], base_retain, 0.99, nll_bound=min(added) - 1e-3) is None
    assert sweep.choose(result["points"], base_retain, 0.99, nll_bound=max(added) + 1) is sweep.choose(
        result["points"], base_retain, 0.99
    )


def test_choose_with_the_fluency_floor_by_hand():
    def pt(forget, added, n=1, fired=2):
        return {
            "forget": {"score": forget},
            "retain": {"score": 1.0, "trigger_rate": 0.0},
            "n_features": n,
            "clamp": 1.0,
            "fluency": {"n_fired": fired, "nll_added": added},
        }

    garbled, fluent, worse = pt(0.10, 2.5), pt(0.20, 0.4), pt(0.30, -0.2)
    silent = pt(0.05, None, fired=0)  # no forget prompt fired: no evidence of fluent fired answers
    points = [garbled, fluent, worse, silent]
    assert sweep.choose(points, base_retain=1.0, floor=0.99) is silent  # no floor: the lowest forget score
    assert sweep.choose(points, base_retain=1.0, floor=0.99, nll_bound=1.0) is fluent  # garbled is above the bound
    assert sweep.choose(points, base_retain=1.0, floor=0.99, nll_bound=0.4) is fluent  # the bound is inclusive
    assert sweep.choose(points, base_retain=1.0, floor=0.99, nll_bound=0.3) is worse
    assert sweep.choose(points, base_retain=1.0, floor=0.99, nll_bound=3.0) is garbled
    assert sweep.choose([garbled, silent], base_retain=1.0, floor=0.99, nll_bound=1.0) is None
    no_block = {k: v for k, v in fluent.items() if k != "fluency"}  # a point not measured is not eligible either
    assert sweep.choose([no_block], base_retain=1.0, floor=0.99, nll_bound=1.0) is None


def test_fluency_options_are_checked_before_anything_loads():
    for bad, message in (
        (dict(fluency=0), "--fluency must be at least 1, got 0"),
        (dict(fluency=-3), "--fluency must be at least 1, got -3"),
        (dict(fluency=2, fluency_tokens=0), "--fluency-tokens must be at least 1, got 0"),
        (dict(fluency=2, nll_bound=0.0), "--nll-bound must be a finite number > 0, got 0.0"),
        (dict(fluency=2, nll_bound=-1.0), "--nll-bound must be a finite number > 0, got -1.0"),
        (dict(fluency=2, nll_bound=float("inf")), "--nll-bound must be a finite number > 0, got inf"),
        (dict(fluency=2, nll_bound=float("nan")), "--nll-bound must be a finite number > 0, got nan"),
    ):
        with pytest.raises(DSGError) as err:
            sweep.SweepOptions(**bad).validate()
        assert str(err.value) == message
    sweep.SweepOptions(fluency=1, fluency_tokens=1, nll_bound=1e-6).validate()
    defaults = sweep.SweepOptions()
    assert (defaults.fluency, defaults.fluency_tokens, defaults.nll_bound) == (None, 32, 1.0)


def test_fluency_outputs(fluent, swept):
    out = fluent["out"]
    assert (out / sweep.FLUENCY_PLOT_FILE).stat().st_size > 5000
    summary = (out / sweep.SUMMARY_FILE).read_text()
    base_nll = fluent["result"]["fluency"]["base_nll_per_token"]
    assert f"the base's own answers' NLL ({base_nll:.3f}) + 0.02 nats per token" in summary
    assert "| fired NLL (+ over base) | distinct-2 | leak |" in summary
    assert "Without the fluency floor: dynamic: " in summary and "fluency.png" in summary
    written = json.loads((out / sweep.SWEEP_FILE).read_text())
    assert set(written["chosen_without_fluency_floor"]) == {"dynamic", "static", "overall"}
    assert (
        written["points"][0]["fluency"]["nll_per_token"] == fluent["result"]["points"][0]["fluency"]["nll_per_token"]
    )
    # without --fluency: nothing of it
    plain = swept["out"]
    assert not (plain / sweep.FLUENCY_PLOT_FILE).exists()
    assert "fluency" not in (plain / sweep.SUMMARY_FILE).read_text().lower()
    assert "fluency" not in swept["result"] and "chosen_without_fluency_floor" not in swept["result"]
    assert all("fluency" not in p for p in swept["result"]["points"])


def test_fluency_on_the_command_line(world, questions, tmp_path, capsys):
    from test_build import cli

    common = [
        "sweep",
        "--base",
        world.base,
        "--sae",
        world.sae_z,
        "--forget",
        *world.forget_sources,
        "--retain",
        *world.retain_sources,
        "--forget-mcq",
        questions["forget"],
        "--retain-mcq",
        questions["retain"],
        "--seq-len",
        SEQ_LEN,
        *("--packing", "--score", "window"),  # the tiny world's packed rows, and the window score
        "--batch-size",
        64,
        "--modes",
        "dynamic",
        "--n-features-grid",
        2,
        "--clamps",
        8,
        "--ratio-percentiles",
        90,
    ]
    for extra, message in [
        (["--fluency", "0"], "--fluency must be at least 1"),
        (["--fluency", "2", "--fluency-tokens", "0"], "--fluency-tokens must be at least 1"),
        (["--fluency", "2", "--nll-bound", "0"], "--nll-bound must be a finite number > 0"),
    ]:
        target = tmp_path / f"bad{extra[-2]}"
        assert cli(*common, "--out", target, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not target.exists()
    # more questions asked for than fire: the scan reads every forget question and keeps the 6 that fire
    out = tmp_path / "fluency"
    assert cli(*common, "--out", out, "--fluency", 9, "--fluency-tokens", 3, "--nll-bound", 0.5) == 0
    assert "Fluency floor" in capsys.readouterr().out
    result = json.loads((out / sweep.SWEEP_FILE).read_text())
    assert result["fluency"]["n"] == 9 and result["fluency"]["max_new_tokens"] == 3
    assert result["fluency"]["nll_bound"] == 0.5
    (point,) = result["points"]
    assert point["fluency"]["n_fired"] == 6 and point["fluency"]["scanned"] == 7


# ------------------------------------------------------------------------------------ the dilution attack per gate
@pytest.fixture(scope="module")
def diluted(world, questions, tmp_path_factory):
    grid = dict(modes=("dynamic", "static"), n_features=(1, 2), clamps=(CLAMP,), ratio_percentiles=(90.0,))
    out = tmp_path_factory.mktemp("sweep_dilution") / "report"
    from modeling_dsg.pipelines.build import BuildOptions

    # the paper's gate (the fraction of the whole sequence, any feature): filler dilutes it
    paper = BuildOptions(name="zeta", seq_len=SEQ_LEN, packing=True, batch_size=64, score="fraction", token_gate="any")
    options = dataclasses.replace(options_for(**grid, dilution=4), build=paper)
    return {"result": run_on(world, questions, out, options), "out": out, "options": options}


def test_dilution_cells_are_the_guards_decisions(world, questions, diluted):
    """Every cell of a gate's attack, recomputed prompt by prompt with the built model's own decisions."""
    import torch

    from modeling_dsg.data.mcq import letter_prompt, load_mcq
    from modeling_dsg.data.sources import load_base_model, load_sae, load_texts
    from modeling_dsg.evaluation.dilution import DILUTIONS, dilution_grid, filler_tokens
    from modeling_dsg.evaluation.report import PLACEMENTS
    from modeling_dsg.pipelines.build import assemble, build_guardrail

    result = diluted["result"]
    assert result["dilution"]["n"] == 4 and result["dilution"]["factors"] == list(DILUTIONS)
    point = next(p for p in result["points"] if p["mode"] == "dynamic" and p["n_features"] == 2)
    options = diluted["options"]
    bo = dataclasses.replace(options.build, n_features=2, clamp=CLAMP, ratio_percentile=90.0)
    base, tok = load_base_model(str(world.base))
    texts = [[t for s in sources for t in load_texts(s)] for sources in (world.forget_sources, world.retain_sources)]
    built = build_guardrail(base, tok, load_sae(str(world.sae_z)), *texts, bo, sae_layer=1)
    assert built.guardrail["features"] == point["features"] and built.guardrail["threshold"] == point["tau"]
    model = assemble(base, tok, [built])

    def fired(ids):
        with torch.no_grad(), model.record_guardrails() as records:
            model(input_ids=torch.tensor([ids]))
        return bool(records[0]["fired"][0])

    forget, retain = load_mcq(str(questions["forget"]), "forget"), load_mcq(str(questions["retain"]), "retain")
    prompts = tok([letter_prompt(r) for r in forget.records[:4]])["input_ids"]
    filler = filler_tokens(tok, [r["question"] for r in retain.records])
    offsets = np.random.default_rng(0).integers(0, len(filler), size=len(prompts))
    before = [fired(p) for p in prompts]
    assert point["dilution"]["undiluted_trigger_rate"] == sum(before) / len(before) > 0
    cells = {}
    for _, _, key, seqs in dilution_grid(prompts, filler, offsets, tok.bos_token_id, PLACEMENTS, DILUTIONS, ""):
        evaded = sum(b and not fired(s) for b, s in zip(before, seqs))
        cells[key] = evaded / sum(before)
    assert point["dilution"]["attack_success"] == cells
    assert point["dilution"]["worst_attack_success"] == max(cells.values())
    assert max(cells.values()) > 0  # filler 10x the prompt's length switches the marker gate off somewhere


def test_dilution_in_the_summary_and_its_option(diluted):
    summary = (diluted["out"] / sweep.SUMMARY_FILE).read_text()
    assert "| worst dilution attack |" in summary and "Dilution attack: the first 4 forget questions" in summary
    static = [line for line in summary.splitlines() if line.startswith("| static | static |")]
    assert static and static[0].endswith(" static |")  # static points act on every token: nothing to dilute
    for p in diluted["result"]["points"]:
        assert (p["mode"] == "dynamic") == isinstance(p.get("dilution"), dict)
    with pytest.raises(DSGError, match="--dilution must be at least 1, got 0"):
        options_for(**GRID, dilution=0).validate()


def test_learned_token_gate_points(world, questions, tmp_path):
    """With the build's --token-gate learned, every dynamic point fits its own integer weights, is scored through the
    DSG model with exactly that gate (no decision mismatch) and is attacked with it: the undiluted prompts of the
    attack are the forget questions, so their trigger rate is the point's own."""
    from modeling_dsg.pipelines.build import BuildOptions

    grid = dict(modes=("dynamic",), n_features=(1, 2), clamps=(CLAMP,), ratio_percentiles=(90.0,))
    options = dataclasses.replace(
        options_for(**grid, scores=("fraction", "window"), windows=(4,), dilution=7),
        build=BuildOptions(name="zeta", seq_len=SEQ_LEN, packing=True, batch_size=64, token_gate="learned"),
    )
    points = run_on(world, questions, tmp_path / "learned", options)["points"]
    assert len(points) == 4 and all("error" not in p for p in points)
    for p in points:
        assert len(p["token_weights"]) == p["n_features"] == len(p["features"]) and p["token_threshold"] >= 1
        assert p["forget"]["decision_mismatches"] == p["retain"]["decision_mismatches"] == 0
        assert p["dilution"]["undiluted_trigger_rate"] == pytest.approx(p["forget"]["trigger_rate"], abs=1e-12)


def test_save_best_keeps_the_chosen_gate(world, questions, tmp_path):
    """--save-best writes the chosen point's guardrail: its score, window, token gate and tau (the build's own gate,
    window 32, is not in this grid)."""
    grid = dict(modes=("dynamic",), n_features=(2,), clamps=(CLAMP,), ratio_percentiles=(90.0,))
    options = options_for(**grid, scores=("fraction", "window"), windows=(4,), threshold_percentiles=(50.0, 95.0))
    best = tmp_path / "best"
    result = run_on(world, questions, tmp_path / "report", options, save_best=best)
    chosen = result["chosen"]["overall"]
    (g,) = json.loads((best / "config.json").read_text())["guardrails"]
    assert (g["score"], g["features"], g["threshold"]) == (chosen["score"], chosen["features"], chosen["tau"])
    assert (g["token_weights"], g["token_threshold"]) == (chosen["token_weights"], chosen["token_threshold"])
    if chosen["score"] == "window":
        assert g["window"] == chosen["window"] == 4
    record = json.loads((best / "dsg_build.json").read_text())["guardrails"][0]
    assert record["calibration"]["threshold_percentile"] == chosen["rule_value"]


def test_static_points_of_a_points_sweep_take_flags(world, questions, tmp_path):
    """--token-value points weighs the dynamic classifier's tokens; the sweep's static points (which have no
    classifier) drop it instead of being refused, and its dynamic points keep it."""
    from modeling_dsg.pipelines.build import BuildOptions

    grid = dict(modes=("dynamic", "static"), n_features=(2,), clamps=(CLAMP,), ratio_percentiles=(90.0,))
    options = dataclasses.replace(
        options_for(**grid),
        build=BuildOptions(
            name="zeta", seq_len=SEQ_LEN, packing=True, batch_size=64, token_gate="learned", token_value="points"
        ),
    )
    points = run_on(world, questions, tmp_path / "points", options)["points"]
    assert sorted(p["mode"] for p in points) == ["dynamic", "static"] and all("error" not in p for p in points)
    (dynamic,) = [p for p in points if p["mode"] == "dynamic"]
    assert dynamic["token_value"] == "points" and dynamic["forget"]["decision_mismatches"] == 0
