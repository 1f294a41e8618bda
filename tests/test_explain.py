"""`dsg explain DIR TEXT` on the controlled models of test_build: rho against tau, the decision, and the
marker tokens on which the detector features fired, with their top tokens from features.json."""

from __future__ import annotations

import io
import json

import pytest
import torch
from test_build import DETECT_Q, DETECT_Z, ONE_Z_TEXT, PLAIN_TEXT, Q_TEXT, Z_TEXT, cli, get_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


def explain_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli("explain", *argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def positions(text: str, char: str) -> list[int]:
    """Token positions of `char` in `text` under the byte-level tokenizer (BOS at 0)."""
    return [i + 1 for i, c in enumerate(text) if c == char]


def test_explain_a_marker_text(world, capsys):
    code, out, _ = explain_cli(capsys, world.main, Z_TEXT)
    assert code == 0
    tau = world.record("config.json", world.main)["guardrails"][0]["threshold"]
    n_z, n = Z_TEXT.count("z"), len(Z_TEXT)
    lines = out.splitlines()
    assert lines[0] == (
        f"guardrail 'zeta' (layer 1, dynamic, action clamp): rho = {n_z / n:.3f} > tau = {tau:.3f} "
        f"-> FIRED  ({n_z} of {n} tokens flagged)"
    )
    assert lines[1] == (
        "  when it fires: the selected features are set to -2 at every flagged token, so the answer is "
        "the edited model's from the first flagged token on: fluent with a small clamp, degraded or off-topic text "
        "with a large one (such as the paper's 500)"
    )
    lines = lines[1:]
    token_lines = lines[1 : 1 + n_z]
    for pos, line in zip(positions(Z_TEXT, "z"), token_lines):
        fields = line.split()
        assert fields[:2] == [str(pos), "'z'"]
        assert [f for f in fields[2:] if f.startswith("#")] == ["#60", "#42", "#17", "#5"]  # by activation
    assert lines[1 + n_z :] == [f"  feature #{i} top tokens: 'z'" for i in sorted(DETECT_Z)]


def test_explain_plain_and_rare_marker_texts(world, capsys):
    tau = world.record("config.json", world.main)["guardrails"][0]["threshold"]
    code, out, _ = explain_cli(capsys, world.main, PLAIN_TEXT)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        f"guardrail 'zeta' (layer 1, dynamic, action clamp): rho = 0.000 <= tau = {tau:.3f} -> not fired  "
        f"(0 of {len(PLAIN_TEXT)} tokens flagged)"
    )
    assert len(lines) == 2 and lines[1].startswith("  when it fires: the selected features are set to -2 ")
    # one marker: its token is flagged, but rho = 1/len <= tau, so the guardrail does not fire
    code, out, _ = explain_cli(capsys, world.main, ONE_Z_TEXT)
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith(f"-> not fired  (1 of {len(ONE_Z_TEXT)} tokens flagged)")
    assert lines[2].split()[:2] == [str(ONE_Z_TEXT.index("z") + 1), "'z'"]


def test_explain_json(world, capsys):
    code, out, _ = explain_cli(capsys, world.added, "--json", Z_TEXT + " " + Q_TEXT)
    assert code == 0
    results = json.loads(out)
    text = Z_TEXT + " " + Q_TEXT
    assert [r["guardrail"] for r in results] == ["zeta", "qoppa"]
    assert [r["layer"] for r in results] == [1, 2] and [r["fired"] for r in results] == [True, True]
    for r, marker, detectors in ((results[0], "z", DETECT_Z), (results[1], "q", DETECT_Q)):
        assert r["counted_tokens"] == len(text) and r["flagged_tokens"] == text.count(marker)
        assert r["rho"] == pytest.approx(text.count(marker) / len(text), abs=1e-12)
        assert [t["position"] for t in r["tokens"]] == positions(text, marker)
        for t in r["tokens"]:
            assert t["token"] == marker
            assert [f["index"] for f in t["features"]] == list(reversed(detectors))
            acts = [f["activation"] for f in t["features"]]
            assert acts == pytest.approx([acts[-1] * s for s in range(len(detectors), 0, -1)], rel=1e-3)
        assert r["features"] == {str(i): [marker] for i in sorted(detectors)}
    assert results[0]["tau"] == world.record("config.json", world.added)["guardrails"][0]["threshold"]


def test_explain_reads_standard_input(world, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(Q_TEXT))
    code, out, _ = explain_cli(capsys, world.added, "-", "--json")
    assert code == 0
    assert [r["fired"] for r in json.loads(out)] == [False, True]


def test_explain_python_api_agrees_with_the_model(world):
    from modeling_dsg.analysis.explain import explain, format_report

    model = world.load(world.main)
    info = world.record("features.json", world.main)
    results = explain(model, world.tok, Z_TEXT, features_info=info)
    with torch.no_grad(), model.record_guardrails() as records:
        model(**world.tok(Z_TEXT, return_tensors="pt"))
    assert results[0]["rho"] == float(records[0]["rho"][0]) and results[0]["fired"] is True
    assert [t["position"] for t in results[0]["tokens"]] == records[0]["flags"][0].nonzero().flatten().tolist()
    assert results[0]["features"] == {i: ["z"] for i in sorted(DETECT_Z)}
    assert "FIRED" in format_report(results)
    # without features.json the report still explains the decision, only without top tokens
    assert explain(model, world.tok, Z_TEXT)[0]["features"] == {}


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda w, tmp: [tmp / "missing", "text"], "is not a model folder (no config.json)"),
        (lambda w, tmp: [w.base, "text"], "is not a DSG model (model_type 'llama')"),
        (lambda w, tmp: [w.main, "   "], "the text to explain is empty"),
        (lambda w, tmp: [w.main, "--chat", "text"], "--chat: this tokenizer has no chat template"),
    ],
)
def test_explain_bad_inputs(world, tmp_path, capsys, make_args, message):
    code, out, err = explain_cli(capsys, *make_args(world, tmp_path))
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("dsg: error: ") and message in err and "Traceback" not in err
