"""The dilution-robust gate: the "window" score, its exactness, and its advantage under a dilution attack."""

import random

import pytest
import tiny
import torch

from modeling_dsg import DSGConfig, DSGForCausalLM
from modeling_dsg.analysis.selection import calibrate_threshold
from modeling_dsg.analysis.stats import collect
from modeling_dsg.data.rows import Rows
from modeling_dsg.runtime.guard_dsg import window_scores


def brute_force(flags, counted, window):
    """Per row: max over windows of `window` consecutive counted tokens of the flagged fraction;
    the plain fraction when the row has fewer than `window` counted tokens."""
    out = []
    for f, c in zip(flags.tolist(), counted.tolist()):
        seq = [x for x, keep in zip(f, c) if keep]
        if len(seq) < window:
            out.append(sum(seq) / max(len(seq), 1))
        else:
            out.append(max(sum(seq[i : i + window]) / window for i in range(len(seq) - window + 1)))
    return torch.tensor(out, dtype=torch.float64)


def run_chunks(flags, counted, window, cuts, scale=1):
    """rho chunk by chunk as the guard computes it, for bool flags or (with `scale`, the most a token can have)
    long points (token_value "points")."""
    batch = flags.shape[0]
    seen = torch.zeros(batch, dtype=torch.long)
    best = torch.full((batch,), -1.0, dtype=torch.float64)
    tail = torch.zeros(batch, window - 1, dtype=flags.dtype)
    flagged = torch.zeros(batch, dtype=torch.long)
    for a, b in zip([0, *cuts], [*cuts, flags.shape[1]]):
        best, tail = window_scores(flags[:, a:b], counted[:, a:b], window, seen, best, tail, scale)
        assert tail.dtype == flags.dtype
        seen = seen + counted[:, a:b].sum(-1)
        flagged = flagged + (flags[:, a:b] * counted[:, a:b]).sum(-1)
    fraction = flagged.double() / (seen.clamp(min=1).double() * scale)
    return torch.where(seen >= window, best, fraction)


@pytest.mark.parametrize("window", [2, 5, 16])
def test_window_scores_match_brute_force_in_any_chunking(window):
    gen = torch.Generator().manual_seed(window)
    flags = torch.rand(12, 40, generator=gen) < 0.3
    counted = torch.rand(12, 40, generator=gen) < 0.8
    counted[0] = False  # a row with no counted token
    counted[1, :35] = False  # a short row, right-aligned like left padding
    want = brute_force(flags, counted, window)
    assert torch.allclose(run_chunks(flags, counted, window, []), want)
    assert torch.allclose(run_chunks(flags, counted, window, [7, 8, 9, 30]), want)  # prefill + decode-like steps
    assert torch.allclose(run_chunks(flags, counted, window, list(range(1, 40))), want)  # token by token


# -- a tiny model whose feature 0 fires exactly on the letter "z" -----------------------------------
LAYER, WINDOW = 1, 16
FILLER = "the roman empire built long roads across europe and traded grain with many distant provinces. "


def texts(n, density, seed, length=60):
    rng = random.Random(seed)
    letters = "abcdefghijklmnoprstuvw    "
    return ["".join("z" if rng.random() < density else rng.choice(letters) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="module")
def marker_model():
    base = tiny.tiny_base("llama")
    tok = tiny.tiny_tokenizer()
    sample = tok(texts(40, 0.2, 0) + [FILLER], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = base(**sample, output_hidden_states=True).hidden_states[LAYER + 1]
    real = sample["attention_mask"].bool() & (sample["input_ids"] != tiny.BOS)
    h, ids = hidden[real], sample["input_ids"][real]
    on = ids == tok.convert_tokens_to_ids("z")
    direction = h[on].mean(0) - h[~on].mean(0)
    proj = h @ direction
    assert proj[on].min() > proj[~on].max()  # "z" is separable at this layer: an exact detector
    cut = float(proj[on].min() + proj[~on].max()) / 2
    models = {}
    for score in ("fraction", "window"):
        g = tiny.guardrail("standard", layer=LAYER, d_sae=4, features=[0], threshold=0.0, clamp=4.0)
        g.update(score=score, **({"window": WINDOW} if score == "window" else {}))
        config = DSGConfig(text_config=base.config.to_dict(), guardrails=[g])
        model = DSGForCausalLM(config, base_model=tiny.tiny_base("llama")).eval()
        with torch.no_grad():
            sae = model.guards[0].sae
            sae.W_enc.zero_()
            sae.W_enc[:, 0] = direction
            sae.b_enc.fill_(-1e3)
            sae.b_enc[0] = -cut
            sae.W_dec.normal_(0, 0.01)
        models[score] = model
    return models, tok


def decisions(model, tok, prompts):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as rec:
        model(**enc)
    return rec[0]["rho"], rec[0]["fired"]


def test_calibration_equals_the_guard_at_run_time(marker_model):
    models, tok = marker_model
    retain = texts(30, 0.03, 1)
    rows = tok(retain, return_tensors="pt", padding=True)
    rows = Rows(rows["input_ids"], rows["attention_mask"])
    for score, model in models.items():
        guard = model.guards[0]
        with torch.no_grad():
            store = collect(model.model, LAYER, guard.sae.encode, rows, batch_size=7, ignore_token_ids=[tiny.BOS])
        rho, _ = decisions(model, tok, retain)
        assert torch.allclose(store.row_scores([0], score, WINDOW), rho), score


def test_generation_carries_the_window_score():
    """The running window score after decoding equals the score of the whole sequence in one pass."""
    model, _ = tiny.tiny_dsg(
        "llama", [dict(tiny.guardrail("jumprelu", layer=1, threshold=1.0), score="window", window=6)]
    )
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    enc = tok(["a fairly long prompt about cells", "short"], return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as rec:
        out = model.generate(**enc, max_new_tokens=9, do_sample=False)
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 9, dtype=torch.long)], 1)
    with torch.no_grad(), model.record_guardrails() as full:
        model(input_ids=out[:, :-1], attention_mask=mask[:, :-1], use_cache=False)
    assert len(rec) == 9
    assert torch.allclose(rec[-1]["rho"], full[0]["rho"])


def test_window_gate_resists_dilution(marker_model):
    """Prepending harmless filler bypasses the paper's score; the window score keeps firing."""
    models, tok = marker_model
    retain = texts(60, 0.03, 2)  # a little "z" now and then: the retain distribution tau is taken from
    forget = texts(40, 0.35, 3)  # "z"-dense: the topic
    success = {}
    for score, model in models.items():
        rho_retain, _ = decisions(model, tok, retain)
        tau = calibrate_threshold(rho_retain, 95.0)
        model.set_threshold(0, tau)
        _, fired = decisions(model, tok, forget)
        assert fired.all(), (score, tau)  # every undiluted forget prompt fires under both scores
        success[score] = {}
        for times in (1, 2, 5):
            diluted = [FILLER * (times * len(p) // len(FILLER) + 1) + p for p in forget]
            _, fired = decisions(model, tok, diluted)
            success[score][times] = float((~fired).double().mean())  # attack success: no longer fires
    print("attack success (fraction of diluted forget prompts no longer firing):", success)
    assert success["fraction"][5] >= 0.9, success
    assert max(success["window"].values()) == 0.0, success


@pytest.mark.parametrize("window", [2, 5, 16])
def test_window_scores_of_points_match_brute_force_in_any_chunking(window):
    """With token_value "points" a window's score is its points over window x the most a token can have; the
    sums are integers, so every chunking gives the very same float64 (not merely a close one)."""
    gen = torch.Generator().manual_seed(window)
    points = torch.randint(0, 9, (12, 40), generator=gen) * (torch.rand(12, 40, generator=gen) < 0.4)
    counted = torch.rand(12, 40, generator=gen) < 0.8
    counted[0] = False
    counted[1, :35] = False
    scale = 8
    want = brute_force(points, counted, window) / scale
    one_pass = run_chunks(points, counted, window, [], scale)
    assert torch.allclose(one_pass, want, rtol=0, atol=1e-15)
    for cuts in ([7, 8, 9, 30], list(range(1, 40))):
        assert torch.equal(run_chunks(points, counted, window, cuts, scale), one_pass)
    big = torch.full((2, 40), 2**20 * 20, dtype=torch.long)  # window sums past 2**31 stay exact (int64)
    ones = torch.ones(2, 40, dtype=torch.bool)
    assert torch.equal(run_chunks(big, ones, window, [], 2**20 * 20), torch.ones(2, dtype=torch.float64))
