"""Score "features": rho is the largest share, over windows of `window` counted tokens, of the integer weights of
the selected features active somewhere in the window (each feature once), floored at 0.

Integers up to one division, so the decision is exact in any batch, chunking or decoding step, and stored
activations give the guard's rho bit for bit. `dsg build --score features` fits the features and weights on whole
build rows (`selection.fit_feature_gate`)."""

from dataclasses import replace

import pytest
import tiny
import torch
from test_build import cli, world  # noqa: F401  (the tiny world and its CLI runner)
from test_token_gate import (
    fires_on_the_marker_only,
    generation_matches_one_pass,
    hidden_with_uncounted_tokens,
    store_from,
)

from modeling_dsg import DSGConfig
from modeling_dsg.analysis import selection
from modeling_dsg.analysis.stats import collect
from modeling_dsg.data.rows import Rows
from modeling_dsg.runtime.guard_dsg import GuardState

GuardStateFields = GuardState._fields

WEIGHTS = [5, -2, 1, 3, 0]
WINDOW = 3


def feature_gate(threshold=0.5, weights=WEIGHTS, window=WINDOW, **extra):
    g = tiny.guardrail("jumprelu", layer=1, threshold=threshold, **extra)
    g.update(score="features", window=window, token_weights=list(weights))
    return g


def brute_rho(active, counted, weights, window):
    """rho per row by the definition, token by token in Python."""
    scale = sum(w for w in weights if w > 0)
    out = []
    for row_active, row_counted in zip(active.tolist(), counted.tolist()):
        seq = [a for a, keep in zip(row_active, row_counted) if keep]  # counted tokens' active features
        best = 0.0
        for end in range(len(seq)):
            seen = [any(tok[i] for tok in seq[max(0, end - window + 1) : end + 1]) for i in range(len(weights))]
            best = max(best, max(sum(w for w, s in zip(weights, seen) if s), 0) / scale)
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


def test_config_checks_the_features_score():
    base = tiny.tiny_base("llama").config.to_dict()
    stored = DSGConfig(text_config=base, guardrails=[feature_gate()]).guardrails[0]
    assert stored["score"] == "features" and stored["window"] == WINDOW and stored["token_weights"] == WEIGHTS
    default_window = {k: v for k, v in feature_gate().items() if k != "window"}
    assert DSGConfig(text_config=base, guardrails=[default_window]).guardrails[0]["window"] == 32
    plain = {k: v for k, v in feature_gate().items() if k != "token_weights"}
    for guardrail, message in (
        (plain, "score 'features' .* needs 'token_weights'"),
        ({**feature_gate(), "token_value": "points"}, "scores the features of a window"),
        (feature_gate(weights=[0, -1, 0, -3, 0]), "needs a positive token weight"),
        (feature_gate(window=1), "'window' must be an integer"),
    ):
        with pytest.raises(ValueError, match=message):
            DSGConfig(text_config=base, guardrails=[guardrail])


def test_rho_and_edits_match_the_definition():
    model, _ = tiny.tiny_dsg("llama", [feature_gate()], active_rate=0.1)
    guard = model.guards[0]
    gen = torch.Generator().manual_seed(3)
    with model.guardrails_disabled():
        hidden = tiny.sample_hidden(model.model, 1, n_rows=6, length=20).view(6, 20, -1)
    counted = torch.rand(6, 20, generator=gen) < 0.8
    counted[1] = False  # nothing counted: rho 0
    counted[2, :17] = False  # 3 counted tokens: fewer than a window
    with torch.no_grad():
        delta, state, rho, acts, flags = guard(hidden, counted, guard.initial_state(6, "cpu"))
    active = acts > 0
    expected = brute_rho(active, counted, WEIGHTS, WINDOW)
    assert torch.equal(rho, expected)
    assert len(set(expected.tolist())) > 2 and rho[1] == 0  # rows differ: the comparison can fail
    assert torch.equal(state.fired, rho > guard.threshold) and state.fired.any() and not state.fired.all()
    points = (active.long() * torch.tensor(WEIGHTS)).sum(-1)
    assert torch.equal(flags, (points >= 1) & counted)  # the flags `dsg explain` shows: a token's own points
    edit = (active & counted.unsqueeze(-1)).any(-1) & state.fired.unsqueeze(-1)  # fired rows, active tokens
    assert torch.equal(delta.abs().sum(-1) > 0, edit)


@pytest.mark.parametrize("weights", [WEIGHTS, [5, 2, 1, 3, 0]], ids=["a negative weight", "no negative weight"])
@pytest.mark.parametrize("split", [1, 3, 7])
def test_chunks_and_decoding_steps_end_in_the_one_pass_state(split, weights):
    """The state after the whole sequence in one pass equals the state after chunks of `split` tokens (1: the
    decoding-step path), with and without a negative weight, with padding, uncounted tokens
    inside, a short row and an empty row."""
    model, _ = tiny.tiny_dsg("llama", [feature_gate(weights=weights)], active_rate=0.1)
    guard = model.guards[0]
    hidden, counted = hidden_with_uncounted_tokens(model)
    counted[4] = torch.arange(30) % 15 == 3  # 2 counted tokens: fewer than a window of 3
    with torch.no_grad():
        _, whole, rho_whole, _, _ = guard(hidden, counted, guard.initial_state(5, "cpu"))
        for want_flags in (True, False):
            state, crossed = guard.initial_state(5, "cpu"), torch.zeros(5, dtype=torch.bool)
            for t in range(0, 30, split):
                chunk = slice(t, t + split)
                _, state, rho, _, flags = guard(hidden[:, chunk], counted[:, chunk], state, want_flags)
                assert (flags is None) == (not want_flags)
                crossed |= rho > guard.threshold
            assert torch.equal(rho, rho_whole)
            for name in ("flagged", "seen", "best", "tail"):
                assert torch.equal(getattr(state, name), getattr(whole, name)), name
            if split == 1:
                assert torch.equal(state.fired, crossed)  # sticky: fired once rho passed tau at any step
    assert rho_whole.unique().numel() > 2
    active = guard(hidden, counted, guard.initial_state(5, "cpu"))[3] > 0
    assert torch.equal(rho_whole, brute_rho(active, counted, weights, WINDOW))


def test_a_call_with_no_active_feature_changes_only_the_count():
    """With no negative weight, a call in which no selected feature is active takes a short path: only `seen` moves.
    Step by step it ends every call in the state, rho and edit of the full path (which recording forces), also
    after tau is lowered between calls, and on a row that has fired; with a negative weight it is never taken."""
    model, _ = tiny.tiny_dsg("llama", [feature_gate(weights=[5, 2, 1, 3, 0], threshold=0.3)], active_rate=0.1)
    guard = model.guards[0]
    assert guard.quiet_is_a_count
    with model.guardrails_disabled():
        hidden = tiny.sample_hidden(model.model, 1, n_rows=1, length=60, seed=5).view(1, 60, -1)
    counted = torch.ones(1, 60, dtype=torch.bool)
    counted[0, 40:43] = False  # uncounted tokens: the count does not move either
    steps = {"quiet": 0, "active": 0}
    with torch.no_grad():
        active = (guard(hidden, counted, guard.initial_state(1, "cpu"))[3] > 0).any(-1)[0]
        short, full = guard.initial_state(1, "cpu"), guard.initial_state(1, "cpu")
        for t in range(60):
            if t == 30:
                guard.threshold = 0.0  # lowered between calls: the next call fires on the best window so far
            chunk = slice(t, t + 1)
            got = guard(hidden[:, chunk], counted[:, chunk], short, False)
            want = guard(hidden[:, chunk], counted[:, chunk], full, True)
            short, full = got[1], want[1]
            steps["active" if active[t] else "quiet"] += 1
            assert (got[0] is None) == (want[0] is None) and (got[0] is None or torch.equal(got[0], want[0]))
            assert torch.equal(got[2], want[2]), t
            for name in GuardStateFields:
                assert torch.equal(getattr(short, name), getattr(full, name)), (t, name)
            if not active[t]:
                assert got[4] is None and got[0] is None  # the short path: no flags, no edit
    assert steps["quiet"] >= 10 and steps["active"] >= 5  # both paths ran, often
    assert short.fired.all() and short.seen.item() == 57
    negative = tiny.tiny_dsg("llama", [feature_gate(weights=WEIGHTS)], active_rate=0.1)[0].guards[0]
    assert not negative.quiet_is_a_count  # a feature leaving the window may raise the score: the full path


def test_generation_batching_and_stored_activations_give_one_rho():
    model, _ = tiny.tiny_dsg("llama", [feature_gate(threshold=1.0)], active_rate=0.1)
    guard = model.guards[0]
    prompts = ["a fairly long prompt about cells and genes", "short", "membranes and ribosomes"]
    enc, rec = generation_matches_one_pass(model, prompts)
    with torch.no_grad(), model.guardrails_disabled():  # the base's activations, as a build stores them
        store = collect(
            model.model,
            1,
            guard.sae.encode,
            Rows(enc["input_ids"], enc["attention_mask"]),
            batch_size=2,
            ignore_token_ids=[tiny.BOS],
        )
    assert torch.equal(store.guardrail_scores(guard.guardrail_config()), rec[0]["rho"])
    assert len(set(rec[0]["rho"].tolist())) > 1


def test_fit_feature_gate_keeps_the_features_that_mark_forget_rows():
    """Feature 0 appears in every forget row, feature 3 in most, feature 1 in rows of both corpora alike and
    feature 2 in retain rows only: the gate keeps 0 and 3 (sorted), weighs 0 highest, and drops 1 and 2."""
    gen = torch.Generator().manual_seed(0)

    def corpus(rates, rows=60):
        dense = torch.zeros(rows * 10, 6)
        for feature, rate in rates.items():
            hit = (torch.rand(rows, generator=gen) < rate).repeat_interleave(10)
            dense[hit & (torch.rand(rows * 10, generator=gen) < 0.3), feature] = 1.0
        return store_from(dense)

    forget = corpus({0: 1.0, 3: 0.6, 1: 0.5})
    retain = corpus({1: 0.5, 2: 0.8, 3: 0.05})
    features, weights = selection.fit_feature_gate(forget, retain, 4)
    assert features == [0, 3] and weights[0] == 64 and 0 < weights[1] < 64
    assert selection.fit_feature_gate(forget, retain, 1) == ([0], [64])
    with pytest.raises(Exception, match="no SAE feature is active in a larger share"):
        selection.fit_feature_gate(retain, retain, 4)


def test_build_with_the_features_score(world, tmp_path):  # noqa: F811
    def build(out, *extra):
        return cli(
            *("build", "--base", world.base, "--sae", world.sae_z, "--out", out, "--seq-len", 40, "--batch-size", 64),
            "--packing",  # rows of 40 tokens, each one fit sample (this world's documents are longer)
            *("--forget", *world.forget_sources, "--retain", *world.retain_sources, "--score", "features"),
            *extra,
        )

    out = tmp_path / "features"
    assert build(out, "--window", 8, "--n-features", 4, "--target-fpr", 0.3) == 0
    guardrail = world.record("config.json", out)["guardrails"][0]
    assert guardrail["score"] == "features" and guardrail["window"] == 8 and "token_value" not in guardrail
    features, weights = guardrail["features"], guardrail["token_weights"]
    assert 1 <= len(features) <= 4 and features == sorted(features) and max(weights) == 64
    assert len(weights) == len(features)
    assert world.record("dsg_build.json", out)["guardrails"][0]["token_gate"]["gate"] == "features"
    card = fires_on_the_marker_only(world, out, tmp_path)
    assert "score `features`" in card and "any 8 consecutive real tokens" in card
    for extra in (("--mode", "static"), ("--token-gate", "learned"), ("--token-value", "points")):
        assert build(tmp_path / "bad", *extra) == 2 and not (tmp_path / "bad").exists()


def test_explain_shows_the_window_rho_comes_from():
    from modeling_dsg.analysis.explain import explain, format_report

    model, _ = tiny.tiny_dsg("llama", [feature_gate(threshold=0.1)], active_rate=0.1)
    guard = model.guards[0]
    tok = tiny.tiny_tokenizer()
    text = "ribosomes translate messenger rna into proteins inside every cell"
    (result,) = explain(model, tok, text)
    window = result["best_window"]
    assert window["points"] / window["most_points"] == result["rho"] > 0  # rho is that window's share
    assert window["points"] == max(sum(window["features"].values()), 0) and window["most_points"] == 9
    assert 0 < window["last"] - window["first"] + 1 <= WINDOW + 1  # BOS is not counted but may sit inside
    with torch.no_grad(), model.record_guardrails() as rec:
        model(**tok(text, return_tensors="pt"))
    active = rec[0]["acts"][0] > 0
    inside = active[window["first"] : window["last"] + 1].any(0)
    assert window["features"] == {guard.features[j]: WEIGHTS[j] for j in inside.nonzero().flatten().tolist()}
    report = format_report([result])
    assert f"{window['points']} of 9, in tokens {window['first']}..{window['last']}" in report
    assert "a token is flagged when" not in report


def test_the_fit_cuts_long_rows_into_pieces():
    """A row longer than `FEATURE_GATE_SEGMENT` positions is one fit sample per piece of that many, so a packed row
    counts as several. Feature 1 is active in every piece of every forget row and in one piece of every retain row:
    active somewhere in every whole row of both corpora, it is no candidate on whole rows, and the fit on pieces
    keeps it. Feature 0 (one piece of every forget row, no retain row) is kept either way."""
    segment = selection.FEATURE_GATE_SEGMENT
    length, rows = 3 * segment, 12
    gen = torch.Generator().manual_seed(0)

    def corpus(pieces_of):  # {feature: which pieces (0-2) of every row hold it}
        dense = torch.zeros(rows * length, 3)
        for feature, pieces in pieces_of.items():
            for row in range(rows):
                for piece in pieces:
                    start = row * length + piece * segment + int(torch.randint(segment, (1,), generator=gen))
                    dense[start, feature] = 1.0
        return store_from(dense, row_length=length)

    forget, retain = corpus({0: [1], 1: [0, 1, 2]}), corpus({1: [2], 2: [0]})
    pieces = forget.row_activity(segment)
    assert pieces.shape == (rows * 3, 3) and forget.row_activity().shape == (rows, 3)
    dense = forget.feature_activity([0, 1, 2]).view(rows, 3, segment, 3)  # [row, piece, position, feature]
    assert torch.equal(pieces, dense.any(2).view(rows * 3, 3))  # in row order, then piece order
    whole = retain.row_activity()
    assert whole[:, 1].all() and forget.row_activity()[:, 1].all()  # whole rows cannot tell feature 1 apart
    features, weights = selection.fit_feature_gate(forget, retain, 3)
    assert features == [0, 1] and min(weights) > 0


def test_the_default_falls_back_to_the_window_score_when_the_fit_finds_nothing():
    """Feature 0 is active in every row of both corpora and feature 1 in more retain rows than forget rows: no
    feature marks forget rows. The default score falls back to the window score (recorded, with the fit's reason) and
    the guardrail config says "window"; an explicit --score features refuses."""
    from modeling_dsg.pipelines.build import BuildOptions, Statistics, guardrail_from, select_and_calibrate

    gen = torch.Generator().manual_seed(0)

    def corpus(rate_1):
        dense = torch.zeros(40 * 10, 2)
        dense[::10, 0] = 1.0
        dense[torch.rand(400, generator=gen) < rate_1, 1] = 1.0
        return store_from(dense)

    forget, retain = corpus(0.05), corpus(0.2)
    statistics = Statistics(
        layer=0,
        sae_spec={"d_sae": 2},
        sae_state={},
        forget_rows=None,
        stores={"forget": forget, "retain": retain},
        stats=selection.FeatureStats.from_stores(forget, retain),
    )
    options = BuildOptions(n_features=2, threshold_percentile=95.0)
    chosen = select_and_calibrate(statistics, options)
    assert chosen.score == "window" and chosen.gate["fallback"].startswith("score features: no SAE feature")
    config = guardrail_from(statistics, chosen.features, chosen.tau, replace(options, score=chosen.score))
    assert config["score"] == "window" and config["window"] == 32
    with pytest.raises(Exception, match="no SAE feature is active in a larger share"):
        select_and_calibrate(statistics, replace(options, score="features"))


def test_the_demo_builds_the_features_gate_with_a_false_positive_bound():
    from modeling_dsg.embedded.demo import DEMO_OPTIONS
    from modeling_dsg.pipelines.build import BuildOptions

    options = BuildOptions(**DEMO_OPTIONS)
    options.validate()
    assert (options.score, options.window, options.n_features, options.target_fpr) == ("features", 32, 20, 0.025)
    assert (options.token_gate, options.token_value, options.packing) == (None, None, False)

    # `dsg build` with no flags builds the same guardrail from the same corpora: every option that decides the
    # rows, the features, the gate, tau and the clamp is the default (the name and the batch size decide nothing)
    default = BuildOptions(name=options.name, batch_size=options.batch_size)
    assert default.scored() == options.scored() and default.calibration() == ("target_fpr", 0.025, True)
    assert {k: v for k, v in vars(default).items() if k not in ("score", "target_fpr")} == {
        k: v for k, v in vars(options).items() if k not in ("score", "target_fpr")
    }


@pytest.mark.parametrize("slim", [False, True])
def test_a_saved_folder_loads_with_its_code_and_decides_the_same(tmp_path, slim):
    """Saved (whole or slim) and loaded through `AutoModelForCausalLM` with the folder's own code, the guardrail keeps
    its score, window and weights and gives the same rho and logits."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny.tiny_dsg("llama", [feature_gate(threshold=0.6)], active_rate=0.1)
    model.save_pretrained(tmp_path, slim=slim)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    (g,) = loaded.config.guardrails
    assert (g["score"], g["window"], g["token_weights"], g["sae"]["slim"]) == ("features", WINDOW, WEIGHTS, slim)
    enc = tiny.tiny_tokenizer()(["genes and cells", "x y"], return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as a:
        logits_a = model(**enc).logits
    with torch.no_grad(), loaded.record_guardrails() as b:
        logits_b = loaded(**enc).logits
    assert a[0]["fired"].tolist() == [True, False]  # one row fires and is edited: the comparison can fail
    assert torch.equal(a[0]["rho"], b[0]["rho"]) and torch.equal(a[0]["fired"], b[0]["fired"])
    assert torch.equal(logits_a, logits_b)
