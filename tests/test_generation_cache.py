"""The guardrails' running state through `generate` on every transformers: it lives on the cache object
that is actually used, under either name of the cache argument, and follows the cache's rows."""

import warnings

import pytest
import tiny
import torch
from transformers import DynamicCache

UNFIRED = ["the history of the roman empire and its roads", "name three rivers in europe please"]


def encode(texts, side="left"):
    tok = tiny.tiny_tokenizer()
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


def busy_model(threshold: float):
    """Selected features active on about 20% of tokens each (most tokens have one), a large clamp."""
    return tiny.tiny_dsg(
        "llama", [tiny.guardrail("jumprelu", layer=1, threshold=threshold, clamp=60.0)], active_rate=0.2
    )


def test_unfired_greedy_generation_equals_base_over_40_tokens():
    model, reference = busy_model(threshold=0.9)
    enc = encode(UNFIRED)
    with torch.no_grad(), warnings.catch_warnings(), model.record_guardrails() as records:
        warnings.simplefilter("error")  # no warning of ours (nor a deprecation from the cache names)
        out = model.generate(**enc, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        base = reference.generate(**enc, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    steps = records[1:]
    assert len(steps) == 39
    assert sum(int(s["flags"].sum()) for s in steps) > 10  # new tokens do flag: judged alone they would fire
    assert not any(bool(r["fired"].any()) for r in records)  # judged on the running rho they do not
    assert torch.equal(out, base)  # token for token


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_both_cache_names_carry_the_state(name):
    model, _ = busy_model(threshold=0.9)
    enc = encode(UNFIRED, side="right")
    ids = enc["input_ids"]
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad(), model.record_guardrails() as records:
        model(input_ids=ids, attention_mask=enc["attention_mask"], use_cache=True, **{name: cache})
        model(
            input_ids=ids[:, :1],
            attention_mask=torch.ones(2, ids.shape[1] + 1, dtype=torch.long),
            use_cache=True,
            **{name: cache},
        )
    assert cache.get_seq_length() == ids.shape[1] + 1  # the base model filled the cache we passed
    assert cache._dsg_tokens == ids.shape[1] + 1
    seen = records[0]["counted"].sum(-1) + records[1]["counted"].sum(-1)
    assert torch.equal(cache._dsg_state[0][1], seen)  # the running count spans both calls


def test_two_different_caches_are_refused():
    model, _ = busy_model(threshold=0.9)
    config = model.config.get_text_config()
    with pytest.raises(ValueError, match="not both"):
        model(
            input_ids=encode(UNFIRED)["input_ids"],
            cache=DynamicCache(config=config),
            past_key_values=DynamicCache(config=config),
        )


def decision_rows(model, prompts):
    """Prefill `prompts` (left-padded) into a fresh cache: (cache, encoding)."""
    enc = encode(prompts, side="left")
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(**enc, cache=cache, use_cache=True)
    return cache, enc


def step(model, cache, mask, token=7):
    batch = mask.shape[0]
    mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad(), model.record_guardrails() as records:
        logits = model(
            input_ids=torch.full((batch, 1), token), attention_mask=mask, cache=cache, use_cache=True
        ).logits
    return logits[:, -1], records[-1]["fired"], mask


def mixed_model():
    """A model where one of three prompts fires on its prompt (the one of highest rho) and two do not."""
    model, _ = busy_model(threshold=0.5)
    prompts = ["cell virus gene protein plasmid", *UNFIRED]
    with torch.no_grad(), model.record_guardrails() as records:
        model(**encode(prompts))
    top = records[0]["rho"].sort(descending=True).values
    assert top[0] > top[1]
    model.set_threshold(0, float(top[0] + top[1]) / 2)
    return model, prompts


def test_state_follows_beam_reordering():
    model, prompts = mixed_model()
    order = torch.tensor([1, 0, 0])
    cache, enc = decision_rows(model, prompts)
    before = cache._dsg_state[0][2].clone()
    assert before.unique().numel() == 2  # the rows' decisions differ, so a reordering shows
    cache.reorder_cache(order)
    logits, fired, _ = step(model, cache, enc["attention_mask"][order])

    reordered = [prompts[i] for i in order]
    fresh, enc2 = decision_rows(model, reordered)
    expected_logits, expected_fired, _ = step(model, fresh, enc2["attention_mask"])
    assert torch.equal(fired, expected_fired)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_batch_select_and_repeat_follow_rows():
    model, prompts = mixed_model()
    cache, _ = decision_rows(model, prompts)
    fired = cache._dsg_state[0][2].clone()
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache._dsg_state[0][2], fired.repeat_interleave(2))
    cache.batch_select_indices(torch.tensor([4, 0]))
    assert torch.equal(cache._dsg_state[0][2], fired[[2, 0]])


def test_crop_of_the_last_call_rolls_the_state_back():
    model, prompts = mixed_model()
    cache, enc = decision_rows(model, prompts)
    after_prompt = {i: tuple(t.clone() for t in s) for i, s in cache._dsg_state.items()}
    first, _, mask = step(model, cache, enc["attention_mask"], token=9)
    cache.crop(-1)  # what generate does to undo one decoding step
    assert cache._dsg_tokens == enc["input_ids"].shape[1]
    for i, state in after_prompt.items():
        for a, b in zip(state, cache._dsg_state[i]):
            assert torch.equal(a, b)
    again, _, _ = step(model, cache, enc["attention_mask"], token=9)
    assert torch.equal(first, again)


def test_crop_inside_a_judged_call_is_refused():
    model, prompts = mixed_model()
    cache, _ = decision_rows(model, prompts)
    with pytest.raises(ValueError, match="assisted or speculative"):
        cache.crop(-2)  # into the prompt the guardrails judged as a whole


def test_beam_search_unfired_equals_base_and_fired_differs():
    model, reference = busy_model(threshold=0.9)
    enc = encode(UNFIRED)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, num_beams=3, num_return_sequences=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**enc, **kwargs), reference.generate(**enc, **kwargs))
    model.set_threshold(0, 0.0)  # now every row fires
    with torch.no_grad():
        assert not torch.equal(model.generate(**enc, **kwargs), reference.generate(**enc, **kwargs))


@pytest.mark.parametrize("option", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_is_refused(option):
    model, reference = busy_model(threshold=0.9)
    value = reference if option == "assistant_model" else 3
    with pytest.raises(ValueError, match="not supported"):
        model.generate(**encode(UNFIRED[:1]), max_new_tokens=4, **{option: value})


def test_continuous_batching_and_packed_rows_are_refused():
    """One packed row would hold several requests, whose decisions would mix: refused, never silent."""
    from transformers import GenerationConfig

    model, _ = busy_model(threshold=0.9)
    with pytest.raises(ValueError, match="continuous batching"):
        model.generate_batch([[1, 40, 41], [1, 50]], generation_config=GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="continuous batching"):
        model.init_continuous_batching()
    ids = torch.tensor([[1, 40, 41, 1, 50, 51]])
    with pytest.raises(ValueError, match="packed inputs"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 3, 6]))
