"""`modeling_dsg.evaluation.actions`: every edit of one guardrail side by side on the same prompts, on the tiny
marker model of test_evaluation (its guardrail fires on texts full of "z"), and the clamp pick with a fluency
floor by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from test_evaluation import World

from modeling_dsg.data.mcq import McqSet
from modeling_dsg.evaluation import actions, fluency
from modeling_dsg.evaluation.evaluate import EvalOptions
from modeling_dsg.evaluation.metrics import mcq_numbers
from modeling_dsg.evaluation.scoring import score_set

EDITS = ["base", "monitor", "refuse", "clamp:6", "clamp:0.5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("when_fired_world"))


@pytest.fixture(scope="module")
def compared(world):
    """The world's DSG model without its guardrail, and `compare_edits` on it for every edit of EDITS."""
    model = copy.deepcopy(world.dsg)
    guard = model.guards[0]
    guardrail, state = guard.guardrail_config(), {k: v.clone() for k, v in guard.sae.state_dict().items()}
    model.remove_guardrail(guard.name)
    sets = {
        "forget": McqSet("zoology", "forget", "test", world.forget),
        "retain": McqSet("general", "retain", "test", world.retain),
    }
    with torch.no_grad():
        result = actions.compare_edits(
            model,
            world.tok,
            guardrail,
            state,
            sets,
            world.forget,
            world.retain[:2],
            EDITS,
            n=3,
            max_new_tokens=4,
            batch_size=2,
            progress=False,
        )
    return {"result": result, "model": model, "guardrail": guardrail, "state": state, "sets": sets}


def test_parse_edit_and_labels():
    assert actions.parse_edit("clamp:3") == {"edit": "clamp:3", "action": "clamp", "clamp": 3.0}
    assert actions.parse_edit("refuse") == {"edit": "refuse", "action": "refuse", "clamp": None}
    assert actions.edit_label("clamp:1e-06") == "ablate (c=1e-06)" and actions.edit_label("clamp:500") == "clamp 500"
    for bad in ("clamp:0", "clamp:-1", "clamp:inf", "erase"):
        with pytest.raises(ValueError):
            actions.parse_edit(bad)


def test_the_fired_prompts_are_the_first_that_fire(world, compared):
    result = compared["result"]
    # the forget records that fire are the four "z" questions; the first three are kept, after looking at three
    assert result["n_fired"] == 3 and result["scanned"] == 3
    assert [p["question"] for p in result["prompts"]] == [r["question"] for r in world.forget[:3]]
    assert set(result["edits"]) == {"base", "monitor", "refuse", "clamp:6", "clamp:0.5"}


def test_monitor_is_the_base_and_base_scores_are_the_plain_models(world, compared):
    edits = compared["result"]["edits"]
    base, monitor = edits["base"], edits["monitor"]
    for key in ("forget", "retain", "fired_cloze_p", "fluency", "examples"):
        assert monitor[key] == base[key], key
    assert monitor["identical_to_base"] == {"forget": 1.0, "retain": 1.0}
    eo = EvalOptions(cloze="correct", known_filter=False, batch_size=2, progress=False)
    with torch.no_grad():
        plain = mcq_numbers(
            score_set(world.base, world.tok, compared["sets"]["forget"], eo, letters=False),
            compared["sets"]["forget"].answers,
        )
    assert base["forget"]["cloze_prob"] == pytest.approx(plain["cloze_prob"], rel=1e-6)


def test_refuse_writes_the_refusal_and_scores_zero(world, compared):
    refuse = compared["result"]["edits"]["refuse"]
    assert refuse["fired_cloze_p"] == 0.0
    refusal = compared["guardrail"].get("refusal") or "I can't help with that."
    # 4 new tokens: each fired answer is the refusal's first 4 tokens
    ids = world.tok(refusal, add_special_tokens=False)["input_ids"][:4]
    assert refuse["examples"] == [world.tok.decode(ids, skip_special_tokens=True)] * 3


def test_a_clamp_edit_equals_a_model_built_with_that_clamp(world, compared):
    """The clamp:0.5 numbers equal those of the guardrail added with clamp 0.5 and measured directly."""
    model, tok = compared["model"], world.tok
    g = {**compared["guardrail"], "clamp": 0.5, "action": "clamp"}
    model.add_guardrail(g, compared["state"])
    try:
        with torch.no_grad():
            block = fluency.measure_fluency(
                model, tok, world.forget[:3], world.retain[:2], 3, max_new_tokens=4, batch_size=2, forget_fire=True
            )
    finally:
        model.remove_guardrail(g["name"])
    point = compared["result"]["edits"]["clamp:0.5"]
    assert point["fluency"]["forget"]["nll_per_token"] == block["sets"]["forget"]["dsg"]["nll_per_token"]
    assert point["examples"] == [x["dsg"] for x in block["sets"]["forget"]["examples"]]
    strong = compared["result"]["edits"]["clamp:6"]
    assert strong["forget"]["cloze_prob"] != compared["result"]["edits"]["base"]["forget"]["cloze_prob"]
    assert not model.guards  # compare_edits and this test leave the model as they found it


def point(forget, retain, nll):
    return {
        "forget": {"cloze_prob": forget},
        "retain": {"cloze_prob": retain},
        "fluency": {"forget": {"nll_per_token": nll}},
    }


def test_pick_clamp_by_hand():
    result = {
        "base_fluency": {"forget": {"nll_per_token": 0.5}},
        "edits": {
            "base": point(0.10, 1.00, 0.5),
            "refuse": point(0.0, 1.00, 4.0),  # not a clamp: never picked
            "clamp:500": point(0.01, 1.00, 7.0),  # lowest forget, fails the floor
            "clamp:5": point(0.02, 0.98, 1.0),  # fails the retain floor (0.99)
            "clamp:3": point(0.03, 1.00, 1.4),  # the pick at bound 1 (NLL 1.4 <= 0.5 + 1)
            "clamp:1": point(0.06, 1.00, 0.6),
        },
    }
    pick = actions.pick_clamp(result, nll_bound=1.0)
    assert pick["clamp"] == "clamp:3" and pick["without_fluency_floor"] == "clamp:500"
    assert pick["retain_floor"] == pytest.approx(0.99) and pick["base_fired_nll"] == 0.5
    assert pick["sensitivity"] == {"0.25": "clamp:1", "0.5": "clamp:1", "1": "clamp:3", "2": "clamp:3", "4": "clamp:3"}
    assert actions.pick_clamp(result, nll_bound=0.05)["clamp"] is None


def test_outputs_of_a_comparison(compared, tmp_path):
    result = compared["result"]
    pick = actions.pick_clamp(result)
    path = actions.plot_frontier(result, pick, tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = actions.table_lines(result, EDITS)
    assert len(table) == 2 + len(EDITS) and table[2].startswith("| base |") and "| 0 |" in table[4]  # refuse: 0
    examples = actions.example_lines(result, EDITS)
    assert sum(line.startswith("**") for line in examples) == 3
    assert sum(line.startswith("| refuse |") for line in examples) == 3


def test_the_results_page_shows_the_comparison(compared):
    """`dsg results`' page: a record of the last run without "actions" renders as before; with the comparison it
    gains the section, the must-show table (base, clamp 500 if measured, the default clamp, refuse, monitor)
    and the examples."""
    import json

    from modeling_dsg.embedded import results
    from modeling_dsg.paths import PACKAGE_DIR

    record = json.loads((PACKAGE_DIR.parent / "results" / "results.json").read_text())
    record.pop("actions", None)
    before = results.results_markdown(record)
    assert "## When the guardrail fires" not in before and "## Held-out trigger rates" in before
    a = copy.deepcopy(compared["result"])
    a["pick"] = actions.pick_clamp(a)
    a["default_clamp"] = 6.0
    a["edits"]["clamp:6"]["label"] += " (default)"
    page = results.results_markdown({**record, "actions": a})
    section = page[page.index("## When the guardrail fires") : page.index("## Held-out trigger rates")]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[:5] == ["edit", "base", "clamp 6 (default)", "refuse", "monitor"]
    assert "![forgetting against fluency](actions.png)" in section
    assert section.count("| refuse | ") == 2 + 3  # the two tables and three examples
    assert "The default clamp (`dsg build`, `dsg demo`) is c = 6" in section
