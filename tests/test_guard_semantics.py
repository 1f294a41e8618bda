"""The guard's promises: exactness, per-row independence, generation state, thread safety."""

import threading

import pytest
import tiny
import torch

PROMPTS = [
    "the cell membrane",
    "viruses replicate inside host cells",
    "a",
    "history of the roman empire",
    "enzymes lower activation energy of reactions",
    "python lists",
    "bacterial plasmids carry genes",
    "mountains",
    "the mitochondria is the powerhouse of the cell",
    "tea",
    "quarks and gluons",
    "a short story about a dog and a ball",
    "protein folding",
    "zz",
    "photosynthesis converts light",
    "ancient greek philosophers debated the nature of virtue",
    "x y z",
    "ribosomes",
]


def encode(texts, side="right"):
    tok = tiny.tiny_tokenizer()
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


def run(model, enc):
    with torch.no_grad(), model.record_guardrails() as rec:
        logits = model(**enc).logits
    return logits, rec


@pytest.fixture(scope="module")
def mixed():
    """A model where, on PROMPTS, some rows fire and some do not."""
    model, reference = tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1)])
    _, rec = run(model, encode(PROMPTS))
    rho = rec[0]["rho"].sort().values
    model.set_threshold(0, float((rho[len(rho) // 2 - 1] + rho[len(rho) // 2]) / 2))
    return model, reference


def test_unfired_rows_are_bit_identical_to_base(mixed):
    model, reference = mixed
    enc = encode(PROMPTS)
    logits, rec = run(model, enc)
    with torch.no_grad():
        base = reference(**enc).logits
    fired = rec[0]["fired"]
    assert 0 < fired.sum() < len(PROMPTS)
    for row in range(len(PROMPTS)):
        if not fired[row]:
            assert torch.equal(logits[row], base[row])
        else:
            assert not torch.equal(logits[row], base[row])


def test_fired_rows_differ_only_from_first_flagged_token(mixed):
    model, reference = mixed
    enc = encode(PROMPTS)
    logits, rec = run(model, enc)
    with torch.no_grad():
        base = reference(**enc).logits
    flags, fired = rec[0]["flags"], rec[0]["fired"]
    for row in torch.nonzero(fired).flatten().tolist():
        first = int(torch.nonzero(flags[row])[0])
        assert torch.equal(logits[row, :first], base[row, :first])
        assert not torch.equal(logits[row, first], base[row, first])


def test_bos_and_padding_are_not_counted(mixed):
    model, _ = mixed
    enc = encode(PROMPTS)
    _, rec = run(model, enc)
    counted = rec[0]["counted"]
    assert torch.equal(counted, enc["attention_mask"].bool() & (enc["input_ids"] != tiny.BOS))
    flags = rec[0]["flags"]
    assert not flags[~counted].any()
    rho = flags.sum(-1) / counted.sum(-1)
    assert torch.allclose(rec[0]["rho"], rho.double())


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_decisions_equal_one_at_a_time(mixed, side):
    model, reference = mixed
    enc = encode(PROMPTS, side)
    logits, rec = run(model, enc)
    with torch.no_grad():
        base_batch = reference(**enc).logits
    worst_base, worst_dsg = 0.0, 0.0
    for row, text in enumerate(PROMPTS):
        single = encode([text])
        single_logits, single_rec = run(model, single)
        assert bool(single_rec[0]["fired"][0]) == bool(rec[0]["fired"][row])
        assert float(single_rec[0]["rho"][0]) == float(rec[0]["rho"][row])
        real = enc["attention_mask"][row].bool()
        with torch.no_grad():
            base_single = reference(**single).logits[0]
        worst_base = max(worst_base, (base_batch[row][real] - base_single).abs().max().item())
        worst_dsg = max(worst_dsg, (logits[row][real] - single_logits[0]).abs().max().item())
    # the guard adds no batch dependence beyond the base model's own batch-vs-single noise
    assert worst_dsg <= max(4 * worst_base, 1e-5), (worst_dsg, worst_base)


def test_generation_carries_and_updates_the_decision():
    model, _ = tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1, threshold=0.0)])
    enc = encode(PROMPTS[:6], "left")
    with torch.no_grad(), model.record_guardrails() as rec:
        model.generate(**enc, max_new_tokens=5, do_sample=False)
    prefill, steps = rec[0], rec[1:]
    assert prefill["flags"].shape[1] == enc["input_ids"].shape[1] and len(steps) == 4
    flagged = prefill["flags"].sum(-1)
    seen = prefill["counted"].sum(-1)
    fired = prefill["fired"].clone()
    for step in steps:
        assert step["flags"].shape[1] == 1  # decode steps see one new token
        flagged = flagged + step["flags"].sum(-1)
        seen = seen + step["counted"].sum(-1)
        assert torch.allclose(step["rho"], flagged.double() / seen.double())  # running rho over prompt + new tokens
        assert torch.all(step["fired"] >= fired)  # once fired, stays fired
        fired = step["fired"]


def test_decision_taken_on_the_prompt_sticks_during_decoding():
    """A row that fired keeps firing when its running rho drops below tau; one that did not, does not."""
    model, _ = tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1, threshold=0.5)])
    guard = model.guards[0]
    hidden = torch.zeros(2, 1, tiny.HIDDEN)  # a new token on which no selected feature is active
    counted = torch.ones(2, 1, dtype=torch.bool)

    def state(flagged, seen, fired):
        _, _, _, best, tail = guard.initial_state(2, "cpu")
        return (torch.tensor(flagged), torch.tensor(seen), torch.tensor(fired), best, tail)

    with torch.no_grad():  # rho so far 0.6 > tau
        delta, new, rho, acts, flags = guard(hidden, counted, state([6, 6], [10, 10], [True, False]))
    assert not flags.any() and delta is None  # nothing edited: the block's output is left as it is
    assert torch.allclose(rho, torch.tensor([6 / 11, 6 / 11], dtype=torch.double))
    assert new[2].tolist() == [True, True]  # 6/11 > 0.5: the second row fires now
    with torch.no_grad():
        _, new, rho, _, _ = guard(hidden, counted, state([6, 5], [12, 11], [True, False]))
    assert (rho <= 0.5).all() and new[2].tolist() == [True, False]  # sticky when fired, not otherwise


def test_static_mode_always_on_and_edits_only_active_features():
    model, reference = tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1, mode="static", threshold=1.0)])
    enc = encode(PROMPTS)
    logits, rec = run(model, enc)
    with torch.no_grad():
        base = reference(**enc).logits
    flags = rec[0]["flags"]
    for row in range(len(PROMPTS)):
        if flags[row].any():
            first = int(torch.nonzero(flags[row])[0])
            assert torch.equal(logits[row, :first], base[row, :first])
            assert not torch.equal(logits[row, first], base[row, first])
        else:
            assert torch.equal(logits[row], base[row])


def test_edit_formula_matches_a_direct_computation():
    """h' = h + ((f' - f) W_dec[sel]) at edited tokens, checked on the hooked layer's output."""
    model, reference = tiny.tiny_dsg("llama", [tiny.guardrail("standard", layer=1, threshold=0.0)])
    guard = model.guards[0]
    enc = encode(["enzymes lower activation energy"])
    with torch.no_grad():
        h = reference(**enc, output_hidden_states=True).hidden_states[2][0]
        edited = model(**enc, output_hidden_states=True).hidden_states[2][0]
        sae = guard.sae
        f = torch.relu(h @ sae.W_enc[:, guard.features] + sae.b_enc[guard.features])
        counted = enc["input_ids"][0] != tiny.BOS
        flag = (f > 0).any(-1) & counted
        f_new = torch.where(flag[:, None], torch.full_like(f, -guard.clamp), f)
        expected = h + (f_new - f) @ sae.W_dec[guard.features]
    assert flag.any()
    assert torch.allclose(edited, expected, atol=1e-5)


def test_disabled_guard_is_the_base_model(mixed):
    model, reference = mixed
    enc = encode(PROMPTS)
    with torch.no_grad(), model.guardrails_disabled():
        logits = model(**enc).logits
        base = reference(**enc).logits
    assert torch.equal(logits, base)


def test_threads_match_sequential_generation(mixed):
    model, _ = mixed
    prompts = [PROMPTS[i : i + 3] for i in range(0, 16, 2)]  # 8 batches

    def gen(batch):
        with torch.no_grad():
            return model.generate(**encode(batch, "left"), max_new_tokens=6, do_sample=False)

    sequential = [gen(batch) for batch in prompts]
    results = [None] * len(prompts)

    def worker(i):
        results[i] = gen(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)


def test_several_guardrails_act_independently():
    guards = [
        tiny.guardrail("jumprelu", name="a", layer=1, threshold=1.0),
        tiny.guardrail("topk", name="b", layer=2, threshold=0.0, features=(1, 2)),
    ]
    model, reference = tiny.tiny_dsg("qwen2", guards)
    enc = encode(PROMPTS[:4])
    logits, rec = run(model, enc)
    assert [r["guardrail"] for r in rec] == ["a", "b"]
    assert not rec[0]["fired"].any()
    model_b, _ = tiny.tiny_dsg("qwen2", guards[1:])
    model_b.guards[0].load_state_dict(model.guards[1].state_dict())
    logits_b, _ = run(model_b, enc)
    assert torch.equal(logits, logits_b)  # guardrail "a" never fires, so only "b" acts


@pytest.mark.parametrize("bos", [tiny.BOS, [tiny.BOS, 7], None], ids=["one BOS", "two BOS ids", "no BOS"])
def test_a_decoding_steps_counted_tokens_follow_the_rule(bos):
    """In a decoding step (one token per row, after the prompt) the tokens that count are exactly those with a nonzero
    mask that are not BOS, for every mask dtype and without a mask."""
    model, _ = tiny.tiny_dsg("llama")
    model.config.text_config.__dict__["bos_token_id"] = bos  # (Llama's config takes no list: some models' do)
    ids = torch.tensor([[5], [tiny.BOS], [7], [9], [tiny.BOS], [7]])
    last = torch.tensor([1, 1, 1, 0, 0, 1])
    ignored = torch.tensor([] if bos is None else bos if isinstance(bos, list) else [bos], dtype=torch.long)
    not_bos = ~torch.isin(ids, ignored)
    for mask, want in (
        (torch.stack([torch.ones(6, dtype=torch.long), last], 1), not_bos & (last != 0)[:, None]),
        (None, not_bos),
    ):
        assert want.any() and (bos is None or not want.all())  # both kinds of token, so the check can fail
        for dtype in (torch.long, torch.bool, torch.float32):
            m = None if mask is None else mask.to(dtype)
            got = model._counted_tokens(ids, m, 6, 1, ids.device, first_chunk=False)
            assert got.dtype == torch.bool and got.shape == (6, 1) and torch.equal(got, want), (dtype, mask is None)
