"""What a fired guardrail does: `clamp` (the paper's edit), `refuse` (the refusal, then end of sequence) or
`monitor` (decide and report, edit nothing). Decisions reach the caller through the model outputs."""

import json
import subprocess
import sys

import pytest
import tiny
import torch
from transformers import pipeline

from modeling_dsg import DSGConfig

REFUSAL = "I can't help with that."
PROMPTS = ["cell virus gene protein plasmid enzyme", "the history of the roman empire and its roads"]


def encode(texts):
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def refusal_ids():
    return tiny.tiny_tokenizer()(REFUSAL, add_special_tokens=False)["input_ids"]


def model_with(action, threshold=0.0, **extra):
    g = tiny.guardrail("jumprelu", layer=1, threshold=threshold, clamp=60.0)
    g["action"] = action
    if action == "refuse":
        g["refusal"], g["refusal_ids"] = REFUSAL, refusal_ids()
    g.update(extra)
    return tiny.tiny_dsg("llama", [g], active_rate=0.2)


def split_threshold(model):
    """Set tau between the two PROMPTS' rho: the first fires, the second does not."""
    with torch.no_grad():
        rho = model(**encode(PROMPTS)).guardrail_decisions["topic"]["rho"]
    assert rho[0] > rho[1]
    model.set_threshold(0, float(rho[0] + rho[1]) / 2)


def test_monitor_is_bit_identical_and_decides_like_clamp():
    monitor, reference = model_with("monitor")
    clamp, _ = model_with("clamp")
    enc = encode(PROMPTS)
    with torch.no_grad():
        watched, enforced, base = monitor(**enc), clamp(**enc), reference(**enc)
    assert torch.equal(watched.logits, base.logits)  # nothing edited, every row
    assert not torch.equal(enforced.logits, base.logits)  # the same guardrail enforcing does edit
    decided, expected = watched.guardrail_decisions["topic"], enforced.guardrail_decisions["topic"]
    assert decided["action"] == "monitor" and bool(decided["fired"].all())
    assert torch.equal(decided["fired"], expected["fired"]) and torch.equal(decided["rho"], expected["rho"])


def test_monitor_generation_equals_base_and_reports_decisions():
    monitor, reference = model_with("monitor")
    split_threshold(monitor)
    enc = encode(PROMPTS)
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        out = monitor.generate(**enc, return_dict_in_generate=True, **kwargs)
        base = reference.generate(**enc, **kwargs)
    assert torch.equal(out.sequences, base)
    fired = out.guardrail_decisions["topic"]["fired"]
    assert fired.tolist()[0] is True and fired.shape == (2,)


def test_refuse_writes_the_refusal_then_eos_and_leaves_other_rows_alone():
    model, reference = model_with("refuse")
    split_threshold(model)
    enc = encode(PROMPTS)
    kwargs = dict(max_new_tokens=40, do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
        base = reference.generate(**enc, **kwargs)
    start = enc["input_ids"].shape[1]
    ids = refusal_ids()
    assert out[0, start : start + len(ids) + 1].tolist() == ids + [tiny.EOS]  # the refusal, then end of sequence
    assert set(out[0, start + len(ids) + 1 :].tolist()) <= {tiny.PAD}  # nothing after it
    assert torch.equal(out[1], base[1][: out.shape[1]]) and base.shape[1] == out.shape[1]  # unfired row: the base


def test_refuse_through_pipeline_and_beam_search():
    model, _ = model_with("refuse")
    tok = tiny.tiny_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = pipe(PROMPTS[0], max_new_tokens=40, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == REFUSAL
    with torch.no_grad():
        beams = model.generate(
            **encode(PROMPTS[:1]), max_new_tokens=40, num_beams=3, num_return_sequences=3, do_sample=False
        )
    start = encode(PROMPTS[:1])["input_ids"].shape[1]
    for row in beams:
        assert tok.decode(row[start:], skip_special_tokens=True) == REFUSAL


def test_refuse_logits_only_put_all_weight_on_the_refusal():
    """Scoring without generate (e.g. MCQ letters): a refusing row's next-token distribution is the
    refusal's first token at every position; any other tokens (the letters) are equally unlikely."""
    model, _ = model_with("refuse")
    split_threshold(model)
    with torch.no_grad():
        logits = model(**encode(PROMPTS)).logits
    first = refusal_ids()[0]
    assert (logits[0].argmax(-1) == first).all()
    others = [i for i in range(60, 64) if i != first]  # four tokens that are not the refusal's first
    letters = logits[0, -1, others].float().log_softmax(-1)
    assert torch.allclose(letters, torch.full((len(others),), -torch.log(torch.tensor(float(len(others))))))
    assert logits[1].argmax(-1).ne(first).any()  # the unfired row keeps its own logits


def test_refuse_needs_the_cache():
    model, _ = model_with("refuse")
    with pytest.raises(ValueError, match="needs the KV cache"):
        model.generate(**encode(PROMPTS), max_new_tokens=4, use_cache=False)


def test_stacked_guardrails_have_their_own_actions():
    watch = tiny.guardrail("jumprelu", name="watch", layer=1, threshold=0.0)
    watch["action"] = "monitor"
    refuse = tiny.guardrail("jumprelu", name="refuse", layer=2, threshold=1.0)  # never fires
    refuse.update(action="refuse", refusal=REFUSAL, refusal_ids=refusal_ids())
    model, reference = tiny.tiny_dsg("llama", [watch, refuse], active_rate=0.2)
    enc = encode(PROMPTS)
    with torch.no_grad():
        out = model(**enc)
        assert torch.equal(out.logits, reference(**enc).logits)
    assert out.guardrail_decisions["watch"]["fired"].all() and not out.guardrail_decisions["refuse"]["fired"].any()
    assert [g.action for g in model.guards] == ["monitor", "refuse"]


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(action="shout"), "unknown action 'shout'"),
        (dict(action="refuse"), "needs 'refusal_ids'"),
        (dict(action="refuse", refusal_ids=[]), "needs 'refusal_ids'"),
        (dict(action="refuse", refusal_ids=[5], refusal=""), "'refusal' must be a non-empty string"),
        (dict(action="clamp", refusal="no"), "'refusal' is only meaningful with action 'refuse'"),
    ],
)
def test_bad_actions_are_refused(changes, message):
    g = {**tiny.guardrail(), **changes}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DSGConfig(text_config=tiny.tiny_base().config.to_dict(), guardrails=[g])


SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    tok.padding_side = "left"
    enc = tok(PROMPTS_REPR, return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    start = enc["input_ids"].shape[1]
    out[folder] = {"texts": [tok.decode(r[start:], skip_special_tokens=True) for r in gen.sequences],
                   "fired": gen.guardrail_decisions["topic"]["fired"].tolist(),
                   "imported": "modeling_dsg" in sys.modules}
print(json.dumps(out))
""".replace("PROMPTS_REPR", repr(PROMPTS))


def test_actions_through_remote_code_in_a_fresh_process(tmp_path):
    folders = {}
    for action in ("refuse", "monitor"):
        model, reference = model_with(action)
        split_threshold(model)
        folders[action] = tmp_path / action
        model.save_pretrained(folders[action])
        tiny.tiny_tokenizer().save_pretrained(folders[action])
    enc = encode(PROMPTS)
    with torch.no_grad():
        base = reference.generate(**enc, max_new_tokens=40, do_sample=False)
    tok = tiny.tiny_tokenizer()
    base_texts = [tok.decode(r[enc["input_ids"].shape[1] :], skip_special_tokens=True) for r in base]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folders["refuse"]), str(folders["monitor"])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    refused, monitored = result[str(folders["refuse"])], result[str(folders["monitor"])]
    assert not refused["imported"] and not monitored["imported"]
    assert refused["texts"] == [REFUSAL, base_texts[1]] and refused["fired"] == [True, False]
    assert monitored["texts"] == base_texts and monitored["fired"] == [True, False]


@pytest.mark.parametrize("action", ["clamp", "refuse", "monitor"])
def test_a_guarded_cache_continued_with_guardrails_disabled_is_the_base(action):
    """A KV cache filled by a guarded call on a row that fired, continued inside `guardrails_disabled`: no
    decision reported, no refusal forced, and (where the prefix was not edited) the base model's logits;
    guarded again, the decision is back."""
    model, reference = model_with(action)
    enc = encode(PROMPTS[:1])
    step = torch.tensor([[5]])
    mask = torch.ones(1, enc["input_ids"].shape[1] + 1, dtype=torch.long)
    with torch.no_grad():
        first = model(**enc, use_cache=True)
        assert bool(first.guardrail_decisions["topic"]["fired"][0])
        with model.guardrails_disabled():
            off = model(input_ids=step, attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
        base = reference(**enc, use_cache=True)
        want = reference(input_ids=step, attention_mask=mask, past_key_values=base.past_key_values, use_cache=True)
        mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
        on = model(input_ids=step, attention_mask=mask, past_key_values=off.past_key_values, use_cache=True)
    assert off.guardrail_decisions == {}
    if action != "clamp":  # a clamp edited the cached prefix itself
        assert torch.equal(off.logits, want.logits)
    assert bool(on.guardrail_decisions["topic"]["fired"][0])
