"""`dsg eval` results reach the model card: a real `dsg eval --baseline ... --dilution` run on the marker
model of test_evaluation, its report.json checked against `report_schema`, and the card rendered from it.

The marker model's guardrail "zeta" fires on prompts dense in the letter "z" (the forget questions);
the dilution numbers are re-derived here by forwarding each diluted prompt on its own through the DSG
model and reading the guard's decision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from test_build import mcq_text
from test_evaluation import World, run_cli

from modeling_dsg.errors import DSGError
from modeling_dsg.evaluation import report as report_schema
from modeling_dsg.evaluation.dilution import DILUTIONS, SEED, dilute
from modeling_dsg.evaluation.report import PLACEMENTS, cell_key
from modeling_dsg.publishing.cards import render_card


def static_copy(src: Path, dst: Path) -> Path:
    """The DSG folder with every guardrail in static mode (the static-clamping baseline)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for g in config["guardrails"]:
        g["mode"] = "static"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


class Run:
    """`dsg eval` with two baselines (an RMU stand-in: another random base; static clamping) and --dilution."""

    def __init__(self, root: Path, world: World, *extra):
        self.world, self.out = world, root / "report"
        self.rmu = root / "rmu"
        tiny.tiny_base("llama", seed=1).save_pretrained(self.rmu)
        self.static = static_copy(world.model_dir, root / "static")
        self.result = run_cli(
            "eval",
            world.model_dir,
            "--forget-mcq",
            world.forget_file,
            "--retain-mcq",
            world.retain_file,
            "--out",
            self.out,
            "--forget-name",
            "biology",
            "--retain-name",
            "general",
            "--no-known-filter",
            "--batch-size",
            4,
            "--no-progress",
            "--dilution",
            "--baseline",
            f"RMU={self.rmu}",
            "--baseline",
            f"static={self.static}",
            *extra,
        )
        assert self.result.code == 0, self.result.err[-3000:]
        self.report = json.loads((self.out / "report.json").read_text())
        self.card = render_card(world.model_dir, "someone/tiny-dsg", eval_dir=self.out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("report_card_world"))


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """With --text: the text NLL row has baselines too, and the text is the dilution filler."""
    return Run(tmp_path_factory.mktemp("report_card"), world, "--text", world.text_file, "--cloze", "all")


def shown(x) -> str:
    """A number as the card shows it: 3 decimals, scientific below 1e-3, "not measured" for null."""
    if x is None:
        return "not measured"
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:.3f}"


def percent(x) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------- baselines
def test_report_follows_the_schema(run):
    report = run.report
    assert report_schema.check_report(report) is report
    assert report["schema_version"] == report_schema.SCHEMA_VERSION
    assert report["baselines"] == ["RMU", "static"]
    assert report["baseline_models"] == {"RMU": str(run.rmu), "static": str(run.static)}
    assert {r["dataset"] for r in report["results"]} == {"biology (forget)", "general (retain)", "wiki (text)"}
    for row in report["results"]:
        assert set(row["baselines"]) == {"RMU", "static"}
        assert all(isinstance(v, float) for v in row["baselines"].values()), row
    by_row = {(r["dataset"], r["metric"]): r for r in report["results"]}
    forget = by_row[("biology (forget)", "cloze log-likelihood")]
    assert forget["baselines"]["static"] != pytest.approx(forget["base"], abs=1e-6)  # static clamping acts on "z"
    assert forget["baselines"]["RMU"] != pytest.approx(forget["base"], abs=1e-6)  # another model altogether
    summary = (run.out / "summary.md").read_text().splitlines()
    assert summary[4] == "| dataset | metric | n | base | DSG | DSG − base | RMU | static |"


def test_card_shows_every_baseline_number(run):
    text = run.card.text
    evaluation = text.split("## Evaluation")[1].split("## Limitations")[0]
    assert "| dataset | metric | n | base | DSG | DSG − base | RMU | static |" in evaluation
    for r in run.report["results"]:
        arrow = " ↑" if r["higher_is_better"] else " ↓"
        delta = f"{r['dsg'] - r['base']:+.3f}"
        line = (
            f"| {r['dataset']} | {r['metric']}{arrow} | {r['n']} | {shown(r['base'])} | {shown(r['dsg'])} | {delta} | "
            f"{shown(r['baselines']['RMU'])} | {shown(r['baselines']['static'])} |"
        )
        assert line in evaluation, line
    assert f"**RMU** (`{run.rmu.parent.name}/rmu`), **static** (`{run.static.parent.name}/static`)" in evaluation
    # the model-index carries this model's (DSG) numbers only
    results = run.card.data.eval_results
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        (r["dataset"], r["metric"], r["dsg"]) for r in run.report["results"]
    ]


# -------------------------------------------------------------------------------------- dilution
def guard_fired(world: World, ids: list[int]) -> bool:
    """The guardrail's decision on one unpadded token sequence, from the DSG model itself."""
    with torch.no_grad(), world.dsg.record_guardrails() as records:
        world.dsg(input_ids=torch.tensor([ids]))
    return bool(records[0]["fired"][0])


def expected_dilution(world: World, filler_texts: list[str]) -> dict:
    """{"1x": step, ..., "suffix 1x": step, ..., "split 10x": step}, prompt by prompt: the letter prompt (+ the " "
    the letters share) with factor x its length of filler (from a seeded offset, the same in every cell) between
    BOS and the prompt, after the prompt, or between its two halves; step as `report_schema.DilutionStep`."""
    prompts = [world.tok(mcq_text(r) + " ")["input_ids"] for r in world.forget]
    assert all(p[0] == tiny.BOS for p in prompts)
    filler = [t for ids in world.tok(filler_texts, add_special_tokens=False)["input_ids"] for t in ids]
    offsets = np.random.default_rng(SEED).integers(0, len(filler), size=len(prompts))
    before = np.array([guard_fired(world, p) for p in prompts])
    out = {}
    for placement in PLACEMENTS:
        for factor in DILUTIONS:
            after = np.array(
                [
                    guard_fired(world, dilute(p, filler, factor, int(o), tiny.BOS, placement))
                    for p, o in zip(prompts, offsets)
                ]
            )
            fired_before, evaded = int(before.sum()), int((before & ~after).sum())
            out[cell_key(placement, factor)] = {
                "fired_before": fired_before,
                "evaded": evaded,
                "attack_success": evaded / fired_before,
                "trigger_rate": after.mean(),
            }
    return out


def check_dilution_block(report: dict, world: World, filler_texts: list[str], filler_name: str) -> dict:
    block = report["dilution"]
    assert {k: block[k] for k in ("dataset", "filler", "n", "factors", "placements", "seed")} == {
        "dataset": "biology (forget)",
        "filler": filler_name,
        "n": len(world.forget),
        "factors": [1, 2, 5, 10],
        "placements": ["prefix", "suffix", "split"],
        "seed": SEED,
    }
    entry = block["by_guardrail"]["zeta"]
    assert list(block["by_guardrail"]) == ["zeta"] and entry["score"] == "fraction"
    assert list(entry) == [
        "score",
        "undiluted_trigger_rate",
        "1x",
        "2x",
        "5x",
        "10x",
        "suffix 1x",
        "suffix 2x",
        "suffix 5x",
        "suffix 10x",
        "split 1x",
        "split 2x",
        "split 5x",
        "split 10x",
    ]  # every cell
    # the undiluted prompts are exactly the ones the letter scoring saw: same decisions as the trigger rates
    forget_rate = report["trigger_rates"]["biology (forget)"]["zeta"]
    assert entry["undiluted_trigger_rate"] == forget_rate["rate"] == 4 / 6
    expected = expected_dilution(world, filler_texts)
    assert len(expected) == 12
    for key, step in expected.items():
        assert entry[key] == pytest.approx(step) and step["fired_before"] == forget_rate["fired"]
        assert 0 <= entry[key]["attack_success"] <= 1 and 0 <= entry[key]["trigger_rate"] <= 1
    return entry


def test_dilution_block_is_the_guards_decisions(run, world):
    check_dilution_block(run.report, world, world.texts, "wiki (text)")


def test_card_shows_the_dilution_figures(run):
    entry = run.report["dilution"]["by_guardrail"]["zeta"]
    text = run.card.text
    evaluation = text.split("## Evaluation")[1].split("## Limitations")[0]
    assert (
        "| guardrail | score | fired without filler | filler at | 1x | 2x | 5x | 10x |\n"
        "|---|---|---:|---|---:|---:|---:|---:|" in evaluation
    )
    summary = (run.out / "summary.md").read_text()
    assert "| guardrail | score | fired undiluted | filler at | 1x | 2x | 5x | 10x |" in summary
    for placement in PLACEMENTS:  # one row per placement, a cell per factor: every cell of the report
        cells = [percent(entry[cell_key(placement, k)]["attack_success"]) for k in (1, 2, 5, 10)]
        assert f"| `zeta` | `fraction` | 66.7% (4 of 6) | {placement} | {' | '.join(cells)} |" in evaluation
        numbers = [shown(entry[cell_key(placement, k)]["attack_success"]) for k in (1, 2, 5, 10)]
        assert f"| `zeta` | `fraction` | 4 of 6 | {placement} | {' | '.join(numbers)} |" in summary
    assert evaluation.count("| `zeta` | `fraction` | 66.7% (4 of 6) |") == 3
    assert (
        "6 forget prompts from biology (forget), each with harmless filler from wiki (text) put in front of the "
        "prompt (prefix), after it (suffix) or between its two halves of tokens (split), at 1x, 2x, 5x, 10x its length"
    ) in evaluation
    limitations = text.split("## Limitations")[1]
    steps = ", ".join(f"{key}: {percent(entry[key]['attack_success'])}" for key in list(entry)[2:])
    assert steps.startswith("1x: ") and steps.count(": ") == 12 and "split 10x: " in steps
    assert f"guardrail `zeta` (score `fraction`): {steps}." in limitations
    assert "Dilution attacks were not measured" not in limitations


def test_card_reads_a_dilution_block_from_before_placements(run, world, tmp_path):
    """A report written before placements (filler in front at 1x/2x/5x, no "placements") passes the schema
    and the card shows it as it always did: no placement column."""
    eval_dir = tmp_path / "eval"
    shutil.copytree(run.out, eval_dir)
    report = json.loads((eval_dir / "report.json").read_text())
    block = report["dilution"]
    del block["placements"]
    block["factors"] = [1, 2, 5]
    entry = block["by_guardrail"]["zeta"]
    for key in [k for k in entry if k not in ("score", "undiluted_trigger_rate", "1x", "2x", "5x")]:
        del entry[key]
    (eval_dir / "report.json").write_text(json.dumps(report))
    assert report_schema.check_report(report) is report
    text = render_card(world.model_dir, eval_dir=eval_dir).text
    evaluation = text.split("## Evaluation")[1].split("## Limitations")[0]
    cells = [percent(entry[f"{k}x"]["attack_success"]) for k in (1, 2, 5)]
    assert "each with harmless filler from wiki (text) put in front at 1x, 2x, 5x its length." in evaluation
    assert "| guardrail | score | fired without filler | 1x | 2x | 5x |\n|---|---|---:|---:|---:|---:|" in evaluation
    assert f"| `zeta` | `fraction` | 66.7% (4 of 6) | {' | '.join(cells)} |\n" in evaluation
    assert "filler at" not in text and "suffix" not in text
    limitations = text.split("## Limitations")[1]
    assert f"guardrail `zeta` (score `fraction`): 1x: {cells[0]}, 2x: {cells[1]}, 5x: {cells[2]}." in limitations


def test_dilution_filler_defaults_to_the_retain_questions(world, tmp_path):
    out = tmp_path / "report"
    result = run_cli(
        "eval",
        world.model_dir,
        "--forget-mcq",
        world.forget_file,
        "--retain-mcq",
        world.retain_file,
        "--out",
        out,
        "--forget-name",
        "biology",
        "--retain-name",
        "general",
        "--no-known-filter",
        "--cloze",
        "none",
        "--no-progress",
        "--dilution",
    )
    assert result.code == 0, result.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    entry = check_dilution_block(report, world, [r["question"] for r in world.retain], "general (retain) questions")
    assert entry["1x"]["attack_success"] < entry["5x"]["attack_success"] == 1.0  # harmless filler: 5x evades all
    assert report["baselines"] == [] and all(r["baselines"] == {} for r in report["results"])
    assert "filler from general (retain) questions" in render_card(world.model_dir, eval_dir=out).text


# ------------------------------------------------------------------------------------ bad inputs
def one_error(result, message: str) -> None:
    lines = result.err.strip().splitlines()
    assert result.code == 2 and lines[-1].startswith("dsg: error: ") and message in lines[-1], result.err[-2000:]
    assert sum("error" in line.lower() for line in lines) == 1 and "Traceback" not in result.err


def test_dilution_needs_a_dynamic_guardrail(world, tmp_path):
    static = static_copy(world.model_dir, tmp_path / "static")
    out = tmp_path / "report"
    result = run_cli(
        "eval",
        static,
        "--forget-mcq",
        world.forget_file,
        "--retain-mcq",
        world.retain_file,
        "--out",
        out,
        "--dilution",
    )
    one_error(result, "--dilution: this model has no dynamic guardrail")
    assert len(result.err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(schema_version=99), "schema_version 99 is not one this version of modeling_dsg reads"),
        (lambda r: r["results"][0].pop("metric"), "results[0]: needs a string 'metric'"),
        (lambda r: r["results"][1]["baselines"].update(PPO=0.5), "results[1]: baseline 'PPO' is not in the report's"),
        (
            lambda r: r["trigger_rates"]["biology (forget)"].update(zeta=0.5),
            "trigger_rates['biology (forget)']['zeta']",
        ),
        (lambda r: r["dilution"]["by_guardrail"]["zeta"].pop("2x"), "dilution.by_guardrail['zeta']['2x']"),
        (
            lambda r: r["dilution"]["by_guardrail"]["zeta"].pop("split 10x"),
            "dilution.by_guardrail['zeta']['split 10x']",
        ),
        (
            lambda r: r["dilution"].update(placements=["prefix", "middle"]),
            "dilution: 'placements' must be a list of distinct",
        ),
        (lambda r: r["dilution"].update(placements=[]), "dilution: 'placements' must be a list of distinct"),
    ],
)
def test_a_report_off_the_schema_is_refused(run, world, tmp_path, change, message):
    eval_dir = tmp_path / "eval"
    shutil.copytree(run.out, eval_dir)
    report = json.loads((eval_dir / "report.json").read_text())
    change(report)
    (eval_dir / "report.json").write_text(json.dumps(report))
    with pytest.raises(DSGError, match=r"evaluation report .*report\.json: ") as err:
        render_card(world.model_dir, eval_dir=eval_dir)
    assert message in str(err.value)
    staging = tmp_path / "staging"
    result = run_cli(
        "publish", world.model_dir, "--repo-id", "someone/tiny-dsg", "--eval", eval_dir, "--dry-run", staging
    )
    one_error(result, message)
    assert not staging.exists()


def test_card_states_the_tested_transformers_range(run):
    import re

    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', pyproject).groups()
    assert f"tested on transformers `>={low}, <{high}`" in run.card.text


def test_card_shows_what_fired_answers_look_like(world, tmp_path):
    """`dsg eval --fluency`: the card's table holds the report's numbers for base and DSG per prompt set, and the
    first example of each set."""
    out = tmp_path / "report"
    run = run_cli(
        "eval",
        world.model_dir,
        "--forget-mcq",
        world.forget_file,
        "--retain-mcq",
        world.retain_file,
        "--out",
        out,
        "--forget-name",
        "biology",
        "--retain-name",
        "general",
        "--no-known-filter",
        "--no-progress",
        "--fluency",
        2,
        "--fluency-tokens",
        4,
    )
    assert run.code == 0, run.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    evaluation = render_card(world.model_dir, "someone/tiny-dsg", eval_dir=out).text.split("## Evaluation")[1]
    evaluation = evaluation.split("## Limitations")[0]
    assert "What an answer looks like (`dsg eval --fluency`): greedy answers of 4 new tokens" in evaluation
    for label, entry in report["fluency"]["sets"].items():
        for who, name in (("base", "base"), ("dsg", "DSG")):
            m = entry[who]
            cells = ["not measured" if m[k] is None else f"{m[k]:.3f}" for k in ("nll_per_token", "distinct_2")]
            line = f"| {label} | {entry['n']} | {name} | {' | '.join(cells)} | {percent(m['answer_leak_rate'])} |"
            assert line in evaluation, line
        question = " ".join(entry["examples"][0]["question"].split())
        question = question if len(question) <= 120 else question[:119] + "…"  # a long question is cut
        assert f"| {label} | {question} |" in evaluation
    without = render_card(world.model_dir, "someone/tiny-dsg").text
    assert "What an answer looks like" not in without
