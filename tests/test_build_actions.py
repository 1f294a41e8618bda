"""`dsg build --action clamp|refuse|monitor [--refusal TEXT]` on the controlled world of test_build, and the
tooling on the models it writes: reload (in process and through remote code in a fresh process), stacking
guardrails with different actions (`--add-to`), `dsg explain`, the model card and `dsg eval`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys

import pytest
import tiny
import torch
from test_build import CLAMP, PAPER_GATE, PAPER_ROWS, PLAIN_TEXT, Q_TEXT, SEQ_LEN, Z_TEXT, cli, get_world, words
from test_cli import assert_one_error, build_args

from modeling_dsg.errors import DSGError
from modeling_dsg.runtime.configuration_dsg import ACTIONS, DEFAULT_REFUSAL

REFUSAL = "No comment."


class Built:
    """Models built from the world's "z" topic with each action, and two stacks of different actions."""

    def __init__(self, world, root):
        from modeling_dsg.pipelines.build import BuildOptions, build

        self.world, self.root = world, root
        common = [
            "--base",
            world.base,
            "--sae",
            world.sae_z,
            "--forget",
            *world.forget_sources,
            "--retain",
            *world.retain_sources,
            "--name",
            "zeta",
            "--seq-len",
            SEQ_LEN,
            "--clamp",
            CLAMP,
            "--batch-size",
            64,
            *PAPER_GATE,  # as the main build of test_build, which the clamp build is compared with
            *PAPER_ROWS,
        ]
        self.stdout = {}
        for action, extra in (("clamp", []), ("refuse", ["--refusal", REFUSAL]), ("monitor", [])):
            self.stdout[action] = world.cli_ok("build", *common, "--action", action, *extra, "--out", root / action)
        # --add-to: a monitoring "q" guardrail on the refusing model (CLI) ...
        self.stacked = root / "stacked"
        self.stdout["stacked"] = world.cli_ok(
            "build",
            "--add-to",
            root / "refuse",
            "--sae",
            world.sae_q,
            "--forget",
            world.forget_q,
            "--retain",
            *world.retain_sources,
            "--out",
            self.stacked,
            "--name",
            "qoppa",
            "--seq-len",
            SEQ_LEN,
            "--batch-size",
            64,
            "--ratio-percentile",
            96,
            "--action",
            "monitor",
        )  # 96: the "q" detectors only
        # ... and a refusing one with the default refusal on the monitoring model (Python API)
        self.stacked_api = root / "stacked_api"
        self.api_info = build(
            None,
            str(world.sae_q),
            [str(world.forget_q)],
            world.retain_sources,
            self.stacked_api,
            add_to=str(root / "monitor"),
            options=BuildOptions(name="qoppa", seq_len=SEQ_LEN, batch_size=64, ratio_percentile=96, action="refuse"),
        )

    def folder(self, action):
        return self.root / action

    def config(self, folder) -> dict:
        return json.loads((folder / "config.json").read_text())

    def guardrails(self, folder) -> list[dict]:
        return self.config(folder)["guardrails"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    return Built(world, tmp_path_factory.mktemp("actions"))


def token_ids(text) -> list[int]:
    return tiny.tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ the build
def test_each_action_is_written_into_the_config_and_the_record(world, built):
    for action in ACTIONS:
        (g,) = built.guardrails(built.folder(action))
        assert g["action"] == action
        record = json.loads((built.folder(action) / "dsg_build.json").read_text())["guardrails"][0]
        assert record["action"] == action and record["options"]["action"] == action
        assert f"action {action}" in built.stdout[action]
        if action == "refuse":
            assert g["refusal"] == REFUSAL and g["refusal_ids"] == token_ids(
                REFUSAL
            )  # no BOS: add_special_tokens=False
            assert record["refusal"] == REFUSAL and record["refusal_ids"] == token_ids(REFUSAL)
            assert "action refuse (refusal 'No comment.')" in built.stdout[action]
        else:
            assert "refusal" not in g and "refusal_ids" not in g and "refusal" not in record
    # the action changes nothing else: selection, tau and the clamp are those of the default (clamp) build
    main = world.record("config.json", world.main)["guardrails"][0]
    assert main["action"] == "clamp"
    assert built.guardrails(built.folder("clamp"))[0] == main
    for action in ("refuse", "monitor"):
        g = {k: v for k, v in built.guardrails(built.folder(action))[0].items() if k not in ("refusal", "refusal_ids")}
        assert g == {**main, "action": action}


def test_stacked_guardrails_keep_their_own_actions(built):
    first, second = built.guardrails(built.stacked)
    assert first == built.guardrails(built.folder("refuse"))[0]  # --add-to leaves the existing guardrail alone
    assert (first["action"], second["action"], second["name"]) == ("refuse", "monitor", "qoppa")
    first, second = built.guardrails(built.stacked_api)
    assert first == built.guardrails(built.folder("monitor"))[0]
    assert second["action"] == "refuse" and second["refusal"] == DEFAULT_REFUSAL  # the default refusal
    assert second["refusal_ids"] == token_ids(DEFAULT_REFUSAL)
    assert built.api_info["action"] == "refuse" and built.api_info["refusal"] == DEFAULT_REFUSAL
    record = json.loads((built.stacked_api / "dsg_build.json").read_text())
    assert [g["action"] for g in record["guardrails"]] == ["monitor", "refuse"]


def test_reloaded_folders_act_as_their_action_says(world, built):
    from modeling_dsg import DSGForCausalLM

    enc = world.tok([Z_TEXT], return_tensors="pt")
    with torch.no_grad():
        base = world.base_model(**enc).logits
        monitor = DSGForCausalLM.from_pretrained(built.folder("monitor")).eval()(**enc)
        refuse = DSGForCausalLM.from_pretrained(built.folder("refuse")).eval()(**enc)
        clamp = DSGForCausalLM.from_pretrained(built.folder("clamp")).eval()(**enc)
    assert monitor.guardrail_decisions["zeta"]["fired"].tolist() == [True]
    assert monitor.guardrail_decisions["zeta"]["action"] == "monitor"
    assert torch.equal(monitor.logits, base)  # decided, nothing edited
    assert refuse.guardrail_decisions["zeta"]["fired"].tolist() == [True]
    assert (refuse.logits[0].argmax(-1) == token_ids(REFUSAL)[0]).all()
    assert not torch.equal(clamp.logits, base)


REMOTE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, texts, folders = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
tok = AutoTokenizer.from_pretrained(base_dir)
tok.padding_side = "left"
enc = tok(texts, return_tensors="pt", padding=True)
start = enc["input_ids"].shape[1]
kwargs = dict(max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval().generate(**enc, **kwargs)
out = {"base": base[:, start:].tolist()}
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        gen = model.generate(**enc, return_dict_in_generate=True, **kwargs)
    out[folder] = {"ids": gen.sequences[:, start:].tolist(), "class": type(model).__module__,
                   "texts": tok.batch_decode(gen.sequences[:, start:], skip_special_tokens=True),
                   "fired": {k: v["fired"].tolist() for k, v in gen.guardrail_decisions.items()}}
out["imported"] = "modeling_dsg" in sys.modules
print(json.dumps(out))
"""


def test_actions_through_remote_code_in_a_fresh_process(world, built, tmp_path):
    """A fresh interpreter that never imports modeling_dsg generates, in one left-padded batch, from a prompt the
    guardrail fires on (Z_TEXT) and one it does not (PLAIN_TEXT, or Q_TEXT for the stacked "q" monitor)."""
    texts = [Z_TEXT, PLAIN_TEXT, Q_TEXT]
    folders = [built.folder("refuse"), built.folder("monitor"), built.stacked]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(world.base), json.dumps(texts), *map(str, folders)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("imported") is False
    base = out["base"]
    refusal = token_ids(REFUSAL)

    def refused(ids):  # exactly the refusal, then end of sequence, then only padding
        n = len(refusal)
        return ids[: n + 1] == refusal + [tiny.EOS] and set(ids[n + 1 :]) <= {tiny.PAD}

    res = out[str(built.folder("refuse"))]
    assert res["class"].startswith("transformers_modules.")
    assert res["fired"] == {"zeta": [True, False, False]}
    assert refused(res["ids"][0]) and res["texts"][0] == REFUSAL
    assert res["ids"][1:] == base[1:]  # unfired rows in the same batch are the base model's
    res = out[str(built.folder("monitor"))]
    assert res["fired"] == {"zeta": [True, False, False]} and res["ids"] == base  # every row: the base
    res = out[str(built.stacked)]  # refuse "z", monitor "q"
    assert res["fired"] == {"zeta": [True, False, False], "qoppa": [False, False, True]}
    assert refused(res["ids"][0]) and res["ids"][1:] == base[1:]


# ------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--refusal", "Nope."], "--refusal is only valid with --action refuse (the action is 'clamp')"),
        (
            ["--action", "monitor", "--refusal", "Nope."],
            "--refusal is only valid with --action refuse (the action is 'monitor')",
        ),
        (["--action", "refuse", "--refusal", "  "], "--refusal must be a non-empty text, got '  '"),
    ],
)
def test_bad_refusal_options_are_one_error(world, tmp_path, capfd, extra, message):
    out = tmp_path / "out"
    code = cli("build", *build_args(world), *extra, "--out", out)
    assert_one_error(code, capfd.readouterr().err, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_action_is_refused(world, tmp_path, capfd):
    from modeling_dsg.pipelines.build import BuildOptions, build

    with pytest.raises(SystemExit) as exit_info:  # argparse: the choices are configuration_dsg.ACTIONS
        cli("build", *build_args(world), "--action", "shout", "--out", tmp_path / "out")
    assert exit_info.value.code == 2 and "invalid choice: 'shout'" in capfd.readouterr().err
    with pytest.raises(DSGError, match="unknown --action 'shout' \\(one of clamp, refuse, monitor\\)"):
        build(
            str(world.base),
            str(world.sae_z),
            world.forget_sources,
            world.retain_sources,
            tmp_path / "out",
            options=BuildOptions(action="shout"),
        )
    assert list(tmp_path.iterdir()) == []


def test_the_action_choices_come_from_the_configuration():
    from modeling_dsg.pipelines import build, sweep

    p = argparse.ArgumentParser()
    build.configure_parser(p)
    (action,) = [a for a in p._actions if a.dest == "action"]
    assert tuple(action.choices) == ACTIONS and action.default == "clamp"
    s = argparse.ArgumentParser()
    sweep.configure_parser(s)
    assert not [a for a in s._actions if a.dest in ("action", "refusal")]  # the sweep scores the clamp


def test_refusal_ids_must_be_in_the_vocabulary():
    from modeling_dsg.pipelines.build import refusal_token_ids

    tok = tiny.tiny_tokenizer()
    assert refusal_token_ids(tok, "ok", tiny.VOCAB) == token_ids("ok")
    with pytest.raises(DSGError, match="token id \\d+ is outside the model's vocabulary \\(size 40\\)"):
        refusal_token_ids(tok, "ok", 40)
    with pytest.raises(DSGError, match="tokenizes to no tokens"):
        refusal_token_ids(tok, "", tiny.VOCAB)


def test_sweep_refuses_other_actions():
    from modeling_dsg.pipelines.build import BuildOptions
    from modeling_dsg.pipelines.sweep import SweepOptions

    SweepOptions(build=BuildOptions()).validate()
    with pytest.raises(DSGError, match="dsg sweep scores the clamp action only \\(got action 'monitor'\\)"):
        SweepOptions(build=BuildOptions(action="monitor")).validate()


# ------------------------------------------------------------------------------------ explain and card
def explain(*argv) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli("explain", *argv) == 0
    return buffer.getvalue()


def test_explain_states_the_action_and_what_a_user_sees(world, built):
    lines = explain(built.folder("refuse"), Z_TEXT).splitlines()
    assert lines[0].startswith("guardrail 'zeta' (layer 1, dynamic, action refuse): rho = ") and "-> FIRED" in lines[0]
    assert lines[1] == (
        "  when it fires: the answer is exactly the refusal 'No comment.', then end of sequence; "
        "nothing else is generated"
    )
    lines = explain(built.folder("monitor"), PLAIN_TEXT).splitlines()
    assert "action monitor" in lines[0] and "-> not fired" in lines[0]
    assert lines[1].startswith("  when it fires: nothing changes: the answer is the base model's")
    results = json.loads(explain(built.stacked, "--json", Z_TEXT))
    assert [(r["guardrail"], r["action"]) for r in results] == [("zeta", "refuse"), ("qoppa", "monitor")]
    assert results[0]["refusal"] == REFUSAL and "'No comment.'" in results[0]["when_fired"]
    assert "refusal" not in results[1]


def test_card_states_the_action_and_what_a_user_sees(world, built):
    from modeling_dsg.publishing.cards import render_card

    refuse = render_card(built.folder("refuse"), "me/refuse").content
    assert "| action | `refuse` (the model answers with a fixed refusal) |" in refuse
    assert '| refusal | "No comment.", then end of sequence |' in refuse
    assert (
        '**When it fires**, the answer is exactly the refusal "No comment.", then end of sequence; nothing else '
        "is generated."
    ) in refuse
    assert "the model answers with a fixed refusal instead." in refuse and "that prompt is refused" in refuse
    assert "(recorded, not applied: the action is `refuse`)" in refuse
    monitor = render_card(built.folder("monitor"), "me/monitor").content
    assert "| action | `monitor` (decide and report only; nothing is edited) |" in monitor
    assert "**When it fires**, nothing changes: the answer is the base model's, token for token" in monitor
    assert "to detect, without editing anything, prompts about **zeta**" in monitor
    clamp = render_card(world.main, "me/clamp").content
    assert "| action | `clamp` (the paper's edit: the selected features are clamped) |" in clamp
    assert "**When it fires**, the selected features are set to −2.0 at every flagged token" in clamp
    assert (
        "| clamp | selected features set to −2.0 |" in clamp
        and "that answer is edited, and degraded if the clamp is large" in clamp
    )
    stacked = render_card(built.stacked, "me/stacked").content
    assert stacked.count("| action | ") == 2 and "| action | `monitor`" in stacked and "No comment." in stacked


# ------------------------------------------------------------------------------------ dsg eval
@pytest.fixture(scope="module")
def retain_mcq(tmp_path_factory):
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("mcq") / "retain_mcq.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": words(rng, 10), "choices": [words(rng, 3) for _ in range(4)], "answer": i % 4})
            + "\n"
            for i in range(8)
        )
    )
    return path


def evaluate(world, folder, retain_mcq, out) -> tuple[dict, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli(
            "eval",
            folder,
            "--forget-mcq",
            world.forget_mcq,
            "--retain-mcq",
            retain_mcq,
            "--text",
            world.forget_txt,
            "--out",
            out,
            "--permutations",
            2,
            "--cloze",
            "all",
            "--batch-size",
            4,
            "--no-progress",
        )
    assert code == 0, buffer.getvalue()
    return json.loads((out / "report.json").read_text()), (out / "summary.md").read_text()


def test_eval_of_a_monitor_model_scores_as_the_base(world, built, retain_mcq, tmp_path):
    report, summary = evaluate(world, built.folder("monitor"), retain_mcq, tmp_path / "eval")
    assert report["guardrails"][0]["action"] == "monitor"
    assert report["results"] and all(r["dsg"] == r["base"] for r in report["results"])
    assert report["trigger_rates"]["forget_mcq (forget)"]["zeta"]["rate"] == 1.0  # decisions are still recorded
    assert "Guardrail `zeta` only monitors (action `monitor`)" in summary


def test_eval_of_a_refuse_model_scores_uniform_letters_on_refusing_rows(world, built, retain_mcq, tmp_path):
    """Documented (evaluation.py, report_schema.ReportGuardrail, the card): on a row a `refuse` guardrail fires
    on, the letters are tied, so the correct-letter probability is 1/4 and accuracy is 0 (no answer); the
    answer text's log-likelihood is about -3.4e38 per token."""
    report, summary = evaluate(world, built.folder("refuse"), retain_mcq, tmp_path / "eval")
    assert report["guardrails"][0]["action"] == "refuse" and report["guardrails"][0]["refusal"] == REFUSAL
    assert report["trigger_rates"]["forget_mcq (forget)"]["zeta"]["rate"] == 1.0  # every forget question refuses
    rows = {(r["dataset"], r["metric"]): r for r in report["results"]}
    forget = "forget_mcq (forget)"
    answers = [json.loads(line)["answer"] for line in world.forget_mcq.read_text().splitlines()]
    assert rows[forget, "correct-letter probability"]["dsg"] == pytest.approx(0.25, abs=1e-12)
    assert any(a == 0 for a in answers)  # a first-letter tie rule would score these right
    assert rows[forget, "accuracy"]["dsg"] == 0.0
    assert rows[forget, "correct-letter raw probability"]["dsg"] == 0.0
    assert rows[forget, "cloze log-likelihood per token"]["dsg"] == pytest.approx(
        torch.finfo(torch.float32).min, rel=1e-6
    )
    assert report["trigger_rates"]["retain_mcq (retain)"]["zeta"]["rate"] == 0.0
    assert all(r["dsg"] == r["base"] for r in report["results"] if r["dataset"].endswith("(retain)"))  # unfired: base
    assert "Guardrail `zeta` refuses (action `refuse`)" in summary and "-3.40e+38" in summary
