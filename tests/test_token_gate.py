"""The learned token gate: integer per-feature weights decide which tokens the score counts as flagged.

A token is flagged when the weights of its active selected features add up to `token_threshold` or more; a fired
row is still edited wherever any selected feature is active. The sums are integers, so the decision is exact in
any batch or chunking, and stored activations give exactly the guard's decision."""

import numpy as np
import pytest
import tiny
import torch
from test_build import cli, decisions, world  # noqa: F401  (the tiny world, its CLI runner and helper)

from modeling_dsg import DSGConfig
from modeling_dsg.analysis import selection
from modeling_dsg.analysis.stats import ActivationStore, collect
from modeling_dsg.data.rows import Rows

WEIGHTS, POINTS = [3, -2, 1, 2, 0], 2


def weighted(score="window", threshold=0.2, weights=WEIGHTS, points=POINTS, value="flag", **extra):
    g = tiny.guardrail("jumprelu", layer=1, threshold=threshold, **extra)
    g.update(score=score, token_weights=list(weights), token_threshold=points)
    if score == "window":
        g["window"] = 6
    if value != "flag":
        g["token_value"] = value
    return g


def brute_rho(flags, counted, score, window=6):
    out = []
    for f, c in zip(flags.tolist(), counted.tolist()):
        seq = [x for x, keep in zip(f, c) if keep]
        if score == "fraction" or len(seq) < window:
            out.append(sum(seq) / max(len(seq), 1))
        else:
            out.append(max(sum(seq[i : i + window]) / window for i in range(len(seq) - window + 1)))
    return torch.tensor(out, dtype=torch.float64)


def test_config_checks_the_token_weights():
    base = tiny.tiny_base("llama").config.to_dict()
    good = weighted()
    assert DSGConfig(text_config=base, guardrails=[good]).guardrails[0]["token_weights"] == WEIGHTS
    plain = DSGConfig(text_config=base, guardrails=[tiny.guardrail()]).guardrails[0]
    assert "token_weights" not in plain and "token_threshold" not in plain
    for change, message in (
        (dict(token_weights=[1, 2]), "one per feature"),
        (dict(token_weights=[1.5, 1, 1, 1, 1]), "integers"),
        (dict(token_weights=[True, 1, 1, 1, 1]), "integers"),
        (dict(token_threshold=0), "token_threshold"),
        (dict(mode="static"), "static guardrail"),
    ):
        with pytest.raises(ValueError, match=message):
            DSGConfig(text_config=base, guardrails=[{**good, **change}])
    with pytest.raises(ValueError, match="only meaningful with 'token_weights'"):
        DSGConfig(text_config=base, guardrails=[{**tiny.guardrail(), "token_threshold": 2}])
    points = DSGConfig(text_config=base, guardrails=[weighted(value="points")]).guardrails[0]
    assert points["token_value"] == "points"
    explicit_flag = DSGConfig(text_config=base, guardrails=[{**good, "token_value": "flag"}]).guardrails[0]
    assert explicit_flag == DSGConfig(text_config=base, guardrails=[good]).guardrails[0]  # the default is not stored
    for change, message in (
        (dict(token_value="tokens"), "unknown token_value"),
        (dict(token_value="points", token_weights=[0, -1, 0, -3, 0]), "needs a positive token weight"),
    ):
        with pytest.raises(ValueError, match=message):
            DSGConfig(text_config=base, guardrails=[{**good, **change}])
    with pytest.raises(ValueError, match="'token_value' is only meaningful with 'token_weights'"):
        DSGConfig(text_config=base, guardrails=[{**tiny.guardrail(), "token_value": "points"}])


@pytest.mark.parametrize("score", ["fraction", "window"])
def test_flags_and_edits_match_a_direct_computation(score):
    model, _ = tiny.tiny_dsg("llama", [weighted(score)], active_rate=0.3)
    guard = model.guards[0]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 14, tiny.HIDDEN, generator=gen)
    counted = torch.rand(6, 14, generator=gen) < 0.85
    with torch.no_grad():
        guard.threshold = float(guard(hidden, counted, guard.initial_state(6, "cpu"))[2].median())  # half the rows
        delta, state, rho, acts, flags = guard(hidden, counted, guard.initial_state(6, "cpu"))
    active = (acts > 0) & counted.unsqueeze(-1)
    points = (active.long() * torch.tensor(WEIGHTS)).sum(-1)
    assert torch.equal(flags, points >= POINTS)
    assert (flags != active.any(-1)).any()  # the weights change which tokens count
    assert torch.equal(rho, brute_rho(flags, counted, score))
    assert state.fired.any() and not state.fired.all()
    edited = delta.abs().sum(-1) > 0
    assert torch.equal(edited, active.any(-1) & state.fired.unsqueeze(-1))  # fired rows: every active token


@pytest.mark.parametrize("score", ["fraction", "window"])
def test_points_add_each_tokens_points_floored_at_zero(score):
    """token_value "points": rho is the share of the most points (3 + 1 + 2 = 6 per token) that the counted tokens
    score, each token's points floored at 0; flags (and so `dsg explain`'s flagged tokens) are unchanged, and a
    fired row is edited wherever a selected feature is active, as with flags."""
    model, _ = tiny.tiny_dsg("llama", [weighted(score, value="points")], active_rate=0.3)
    guard = model.guards[0]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 14, tiny.HIDDEN, generator=gen)
    counted = torch.rand(6, 14, generator=gen) < 0.85
    with torch.no_grad():
        guard.threshold = float(guard(hidden, counted, guard.initial_state(6, "cpu"))[2].median())
        delta, state, rho, acts, flags = guard(hidden, counted, guard.initial_state(6, "cpu"))
    active = (acts > 0) & counted.unsqueeze(-1)
    points = (active.long() * torch.tensor(WEIGHTS)).sum(-1)
    assert (points < 0).any() and (points > 0).any()  # both signs occur, so the floor matters
    assert torch.equal(flags, points >= POINTS)
    want = brute_rho(points.clamp(min=0), counted, score) / 6
    assert torch.allclose(rho, want, rtol=0, atol=1e-15)
    assert not torch.allclose(rho, brute_rho(flags, counted, score))
    assert state.tail.dtype == torch.long  # the last window - 1 points (empty for "fraction")
    assert state.fired.any() and not state.fired.all()
    assert torch.equal(delta.abs().sum(-1) > 0, active.any(-1) & state.fired.unsqueeze(-1))


def test_unit_weights_are_the_paper_gate_bit_for_bit():
    """Weights of 1 with a threshold of 1 flag exactly the tokens where a feature is active."""
    plain, _ = tiny.tiny_dsg("llama", [dict(tiny.guardrail("jumprelu", layer=1, threshold=0.1))])
    ones, _ = tiny.tiny_dsg("llama", [weighted("fraction", 0.1, weights=[1] * 5, points=1)])
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    enc = tok(["cells divide and grow", "a short one", "zebra zinc zone zero"], return_tensors="pt", padding=True)
    with torch.no_grad(), plain.record_guardrails() as a:
        want = plain(**enc).logits
    with torch.no_grad(), ones.record_guardrails() as b:
        got = ones(**enc).logits
    assert torch.equal(want, got)
    assert torch.equal(a[0]["flags"], b[0]["flags"]) and torch.equal(a[0]["rho"], b[0]["rho"])


def generation_matches_one_pass(model, prompts):
    """Greedy generation over a left-padded batch of `prompts` ends with the rho of one forward over all its tokens,
    and each prompt alone gets the batch's rho. Returns the tokenized batch and the generation's records."""
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as rec:
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    mask = torch.cat([enc["attention_mask"], torch.ones(3, 8, dtype=torch.long)], 1)
    with torch.no_grad(), model.record_guardrails() as full:
        model(input_ids=out[:, :-1], attention_mask=mask[:, :-1], use_cache=False)
    assert torch.equal(rec[-1]["rho"], full[0]["rho"])
    for i, prompt in enumerate(prompts):  # one row at a time: the same decision as in the batch
        with torch.no_grad(), model.record_guardrails() as alone:
            model(**tok([prompt], return_tensors="pt"))
        assert torch.equal(alone[0]["rho"][0], rec[0]["rho"][i])
    return enc, rec


@pytest.mark.parametrize("value", ["flag", "points"])
def test_generation_and_batching_give_the_one_pass_decision(value):
    model, _ = tiny.tiny_dsg("llama", [weighted("window", threshold=1.0, value=value)], active_rate=0.3)
    generation_matches_one_pass(model, ["a fairly long prompt about cells and genes", "short", "membranes"])


def hidden_with_uncounted_tokens(model):
    """Layer-1 hidden states of 5 rows of 30 tokens and which tokens count: left padding, uncounted tokens after
    20, a row with nothing counted, one with 5 counted tokens and one with 3."""
    gen = torch.Generator().manual_seed(7)
    with model.guardrails_disabled():
        hidden = tiny.sample_hidden(model.model, 1, n_rows=5, length=30).view(5, 30, -1)
    counted = torch.rand(5, 30, generator=gen) < 0.8
    counted[0, :5] = False  # left padding
    counted[1, 20:] = False  # uncounted tokens at the end (after a full window of 6)
    counted[2] = False  # a row with nothing counted
    counted[3] = torch.arange(30) % 6 == 1  # 5 counted tokens: one short of a window of 6
    counted[4] = torch.arange(30) % 10 == 3  # 3 counted tokens
    return hidden, counted


@pytest.mark.parametrize("gate, value", [("any", "flag"), ("weights", "flag"), ("weights", "points")])
@pytest.mark.parametrize("score", ["fraction", "window"])
def test_token_by_token_equals_one_pass_with_uncounted_tokens(gate, score, value):
    """The guard's decoding-step path (one token per call) ends in exactly the one-pass state and rho, also when
    tokens that do not count (padding, a generated BOS) come after the window is full."""
    g = weighted(score, value=value) if gate == "weights" else tiny.guardrail("jumprelu", layer=1, threshold=0.2)
    if gate == "any" and score == "window":
        g.update(score="window", window=6)
    model, _ = tiny.tiny_dsg("llama", [g], active_rate=0.3)
    guard = model.guards[0]
    hidden, counted = hidden_with_uncounted_tokens(model)
    with torch.no_grad():
        _, whole, rho_whole, _, _ = guard(hidden, counted, guard.initial_state(5, "cpu"))
        for want_flags in (True, False):
            state, crossed = guard.initial_state(5, "cpu"), torch.zeros(5, dtype=torch.bool)
            for t in range(30):
                _, state, rho, _, flags = guard(hidden[:, t : t + 1], counted[:, t : t + 1], state, want_flags)
                assert (flags is None) == (not want_flags and value == "points")
                crossed |= rho > guard.threshold
            assert torch.equal(rho, rho_whole)
            for name in ("flagged", "seen", "best", "tail"):
                assert torch.equal(getattr(state, name), getattr(whole, name)), name
            assert torch.equal(state.fired, crossed)  # sticky: fired once rho passed tau at any step


@pytest.mark.parametrize("value", ["flag", "points"])
@pytest.mark.parametrize("score", ["fraction", "window"])
def test_stored_activations_give_the_guards_rho(score, value):
    g = weighted(score, value=value)
    model, _ = tiny.tiny_dsg("llama", [g], active_rate=0.3)
    guard = model.guards[0]
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    texts = ["ribosomes translate messenger rna", "the roman road", "x", "genes and cells and more genes here"]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), model.guardrails_disabled():  # the base's activations, as a build stores them
        rows = Rows(enc["input_ids"], enc["attention_mask"])
        store = collect(model.model, 1, guard.sae.encode, rows, batch_size=3, ignore_token_ids=[tiny.BOS])
    with torch.no_grad(), model.record_guardrails() as rec:
        model(**enc)
    assert torch.equal(store.guardrail_scores(guard.guardrail_config()), rec[0]["rho"])


@pytest.mark.parametrize("adds_bos", [False, True])
def test_unpacked_rows_calibrate_on_the_prompts_the_guard_scores(adds_bos):
    """`--no-packing` (the demo's rows) calibrates on the prompts exactly as the deployed guard sees them: each
    row's stored activations give, bit for bit, the rho the guard computes when its document is sent as a prompt
    (`tokenizer(text)`), also with a tokenizer that has a BOS token but does not add it (SmolLM2's)."""
    from tokenizers import processors

    from modeling_dsg.analysis.decisions import guard_decisions
    from modeling_dsg.data.rows import build_rows

    model, _ = tiny.tiny_dsg("llama", [weighted("window", value="points")], active_rate=0.3)
    guard = model.guards[0]
    tok = tiny.tiny_tokenizer()
    if not adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert (tok("ribosomes")["input_ids"][0] == tiny.BOS) == adds_bos
    texts = [
        "ribosomes translate messenger rna into the proteins of every cell",
        "the roman road ran straight from the coast to the hills beyond",
        "<s>a chat turn keeps its template's own first token and no other",
        "genes and cells and more genes here, then a long tail of plain words",
    ]
    rows = build_rows(texts, tok, seq_len=128, packing=False, max_docs=None)
    with torch.no_grad(), model.guardrails_disabled():
        store = collect(model.model, 1, guard.sae.encode, rows, batch_size=3, ignore_token_ids=[tiny.BOS])
    prompts = tok(texts)["input_ids"]
    order = [prompts.index(row[mask.bool()].tolist()) for row, mask in zip(rows.input_ids, rows.attention_mask)]
    served = guard_decisions(model, tok, texts)[guard.name]["rho"]
    assert torch.equal(store.guardrail_scores(guard.guardrail_config()), served[order])
    assert len(set(served.tolist())) > 1  # the rows score differently: the comparison can fail


def store_from(dense: torch.Tensor, row_length: int = 10) -> ActivationStore:
    """An ActivationStore of `dense` [n_tokens, d_sae] activations, rows of `row_length` tokens."""
    n, d = dense.shape
    nz = dense > 0
    index = nz.nonzero()
    return ActivationStore(
        d_sae=d,
        n_rows=n // row_length,
        n_tokens=n,
        feature_sums=dense.double().sum(0),
        feature_counts=nz.long().sum(0),
        row_token_counts=torch.full((n // row_length,), row_length, dtype=torch.long),
        token_row=(torch.arange(n) // row_length).int(),
        token_pos=(torch.arange(n) % row_length).int(),
        token_id=torch.zeros(n, dtype=torch.int32),
        indptr=torch.cat([torch.zeros(1, dtype=torch.long), nz.long().sum(1).cumsum(0)]),
        feature_index=index[:, 1].int(),
        values=dense[nz],
    )


def test_fit_token_gate_weighs_features_by_how_they_separate():
    """Feature 0 marks forget tokens, feature 1 is as common on both sides, feature 2 marks retain tokens: feature 0
    alone flags a token, feature 1 alone does not, and feature 2 takes points away."""
    gen = torch.Generator().manual_seed(0)

    def side(n, rates):
        return (torch.rand(n, 4, generator=gen) < torch.tensor(rates)).float() * 2.0

    forget = store_from(side(2000, [0.6, 0.5, 0.01, 0.0]))
    retain = store_from(side(3000, [0.01, 0.5, 0.3, 0.0]))
    weights, points = selection.fit_token_gate(forget, retain, [0, 1, 2, 3])
    assert (weights, points) == selection.fit_token_gate(forget, retain, [0, 1, 2, 3])  # deterministic
    assert all(isinstance(w, int) for w in weights) and isinstance(points, int) and points >= 1
    assert weights[0] >= points > weights[1] and weights[2] < 0 and weights[3] == 0
    flags = forget.token_flags([0, 1, 2, 3], weights, points)
    active = torch.zeros(forget.n_tokens, 4, dtype=torch.long)
    for t in range(forget.n_tokens):
        active[t, forget.feature_index[forget.indptr[t] : forget.indptr[t + 1]].long()] = 1
    by_hand = (active * torch.tensor(weights)).sum(1) >= points
    assert torch.equal(flags, by_hand)
    with pytest.raises(Exception, match="counted tokens"):
        selection.fit_token_gate(store_from(torch.zeros(0, 4)), retain, [0])
    # features as common on both sides flag nothing, so the guardrail could never fire: refused, not built
    same = store_from(side(2000, [0.0, 0.5, 0.0, 0.0]))
    with pytest.raises(Exception, match="would flag no token"):
        selection.fit_token_gate(same, store_from(side(3000, [0.0, 0.5, 0.0, 0.0])), [1])


def fires_on_the_marker_only(world, out, tmp_path) -> str:  # noqa: F811
    """The tiny world's build in `out` fires on a text full of the forget marker and not on a plain one; returns its
    model card."""
    from modeling_dsg.publishing.cards import render_card

    model = world.load(out)
    z_heavy = " ".join(["zeta zone zinc"] * 6)
    plain = "the cat sat on the mat and looked at the garden for a while"
    got = decisions(model, world.tok, [z_heavy, plain])
    assert [d["fired"][0] for d in got] == [True, False]
    return render_card(out, eval_dir=tmp_path / "no-eval").text


def test_build_with_a_learned_token_gate(world, tmp_path):  # noqa: F811
    out = tmp_path / "learned"
    world.cli_ok(
        "build",
        "--base",
        world.base,
        "--sae",
        world.sae_z,
        "--forget",
        *world.forget_sources,
        "--retain",
        *world.retain_sources,
        "--out",
        out,
        "--seq-len",
        40,
        "--packing",
        "--batch-size",
        64,
        "--token-gate",
        "learned",
        "--score",
        "window",
        "--window",
        8,
        "--target-fpr",
        0.3,
        "--token-value",
        "flag",
    )
    guardrail = world.record("config.json", out)["guardrails"][0]
    assert "token_value" not in guardrail  # flags, as asked
    weights, points = guardrail["token_weights"], guardrail["token_threshold"]
    assert len(weights) == len(guardrail["features"]) and points >= 1
    assert sum(w for w in weights if w > 0) >= points  # some token can be flagged
    assert world.record("dsg_build.json", out)["guardrails"][0]["options"]["token_gate"] == "learned"
    card = fires_on_the_marker_only(world, out, tmp_path)
    calibration = world.record("dsg_build.json", out)["guardrails"][0]["calibration"]
    assert "Clopper–Pearson upper bound on the retain firing rate is at most 0.3" in card
    assert f"bound {calibration['retain_fpr_upper95']:.3f}" in card and "th percentile of ρ" not in card
    assert "add up to at least" in card and "over any 8 consecutive real tokens" in card
    bad = cli(
        *("build", "--base", world.base, "--sae", world.sae_z, "--out", tmp_path / "bad"),
        *("--forget", *world.forget_sources, "--retain", *world.retain_sources, "--mode", "static"),
        *("--token-gate", "learned"),
    )
    assert bad == 2 and not (tmp_path / "bad").exists()


def test_attack_and_sweep_read_the_token_gate():
    """`attack.fired` decides with the gate's weights (the sweep and results use it)."""
    from modeling_dsg.pipelines.attack import fired

    dense = torch.zeros(20, 3)
    dense[:10, 0] = 1.0  # row 0: feature 0 everywhere; row 1: feature 1 everywhere
    dense[10:, 1] = 1.0
    store = store_from(dense)
    g = {"features": [0, 1], "threshold": 0.5, "score": "fraction"}
    assert fired(store, g).tolist() == [True, True]
    assert fired(store, {**g, "token_weights": [2, 1], "token_threshold": 2}).tolist() == [True, False]
    assert np.array_equal(fired(store, {**g, "token_weights": [1, 1], "token_threshold": 1}), fired(store, g))


def test_explain_shows_each_flagged_tokens_points():
    from modeling_dsg.analysis.explain import explain, format_report

    model, _ = tiny.tiny_dsg("llama", [weighted("fraction", threshold=0.1)], active_rate=0.3)
    tok = tiny.tiny_tokenizer()
    text = "ribosomes translate messenger rna into proteins inside every cell"
    (result,) = explain(model, tok, text)
    assert result["token_gate"] == {"threshold": POINTS, "weights": dict(zip([3, 7, 11, 20, 33], WEIGHTS))}
    assert result["tokens"], "some token is flagged"
    for row in result["tokens"]:
        assert row["points"] == sum(f["weight"] for f in row["features"]) >= POINTS
    with torch.no_grad(), model.record_guardrails() as rec:
        model(**tok(text, return_tensors="pt"))
    assert [r["position"] for r in result["tokens"]] == torch.nonzero(rec[0]["flags"][0]).flatten().tolist()
    report = format_report([result])
    assert f"weights add up to {POINTS}: #3 +3, #7 -2" in report and " points]" in report


def test_the_card_says_how_tokens_are_flagged():
    from modeling_dsg.publishing.cards import score_text

    paper = score_text({"score": "fraction"})
    assert "any selected feature is active" in paper and "the paper's" in paper
    learned = score_text({**weighted("window"), "token_threshold": 7})
    assert "over any 6 consecutive real tokens" in learned and "add up to at least 7" in learned
    assert "the paper's" not in score_text(weighted("fraction"))


def test_build_scores_points_by_default(world, tmp_path):  # noqa: F811
    """`dsg build` with the learned gate scores points by default: the config says so, the guard decides by points,
    the card and `dsg explain` describe it; without the learned gate `--token-value points` is refused before
    anything is written. (`--token-gate learned` alone picks the window score.)"""
    corpora = ("--forget", *world.forget_sources, "--retain", *world.retain_sources)
    out = tmp_path / "points"
    world.cli_ok(
        *("build", "--base", world.base, "--sae", world.sae_z, "--out", out, *corpora, "--token-gate", "learned"),
        *("--seq-len", 40, "--packing", "--batch-size", 64, "--window", 8, "--target-fpr", 0.3),
    )
    guardrail = world.record("config.json", out)["guardrails"][0]
    assert guardrail["token_value"] == "points" and guardrail["token_weights"]
    assert world.record("dsg_build.json", out)["guardrails"][0]["options"]["token_value"] is None  # the default
    model = world.load(out)
    assert model.guards[0].points and model.guards[0].point_scale == sum(
        w for w in guardrail["token_weights"] if w > 0
    )
    z_heavy = " ".join(["zeta zone zinc"] * 6)
    plain = "the cat sat on the mat and looked at the garden for a while"
    assert [d["fired"][0] for d in decisions(model, world.tok, [z_heavy, plain])] == [True, False]
    from modeling_dsg.analysis.explain import explain, format_report
    from modeling_dsg.publishing.cards import render_card

    card = render_card(out, eval_dir=tmp_path / "no-eval").text
    assert "the share of the most points" in card and "token value `points`" in card
    (result,) = explain(model, world.tok, z_heavy)
    assert result["token_gate"]["value"] == "points" and result["tokens"]
    assert all(row["points"] > 0 for row in result["tokens"])  # every token that adds to rho, and only those
    assert "over the most a token can have" in format_report([result])
    for gate in ("any",):
        bad = cli(
            *("build", "--base", world.base, "--sae", world.sae_z, "--out", tmp_path / "bad", *corpora),
            *("--token-gate", gate, "--token-value", "points"),
        )
        assert bad == 2 and not (tmp_path / "bad").exists()
    static = cli(
        *("build", "--base", world.base, "--sae", world.sae_z, "--out", tmp_path / "bad", *corpora),
        *("--mode", "static", "--token-value", "points"),
    )
    assert static == 2 and not (tmp_path / "bad").exists()


def test_the_card_and_attack_read_points():
    from modeling_dsg.pipelines.attack import fired
    from modeling_dsg.publishing.cards import score_text

    text = score_text(weighted("window", value="points"))
    assert "over any 6 consecutive real tokens" in text and "at most 6" in text and "add up to at least" not in text
    dense = torch.zeros(20, 2)
    dense[:10, 0] = 1.0  # row 0: feature 0 (3 points) everywhere; row 1: feature 1 (1 point) everywhere
    dense[10:, 1] = 1.0
    store = store_from(dense)
    g = {"features": [0, 1], "threshold": 0.5, "score": "fraction", "token_weights": [3, 1], "token_threshold": 4}
    assert fired(store, g).tolist() == [False, False]  # no token reaches 4 points: nothing is flagged
    assert store.guardrail_scores({**g, "token_value": "points"}).tolist() == [0.75, 0.25]
    assert fired(store, {**g, "token_value": "points"}).tolist() == [True, False]
