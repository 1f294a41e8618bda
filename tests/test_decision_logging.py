"""Operators see decisions: with transformers' verbosity at info, each row's decision on its prompt and the
token at which a row fires later are logged; nothing is logged by default."""

import tiny
import torch
from test_demo_labels import ChatTokenizer
from transformers.utils import logging as hf_logging


def test_decisions_are_logged_at_info_only(caplog):
    model, _ = tiny.tiny_dsg(
        "llama", [tiny.guardrail("jumprelu", layer=1, threshold=0.9, clamp=60.0)], active_rate=0.2
    )
    tok = ChatTokenizer()
    enc = tok.apply_chat_template([{"content": "the history of the roman empire and its roads"}])
    with torch.no_grad(), model.record_guardrails() as records:
        model(**enc)
    prompt_rho = float(records[0]["rho"][0])
    model.set_threshold(0, prompt_rho + 1e-6)  # not on the prompt; fires later (see test_demo_labels)
    try:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=30, do_sample=False)
        assert not caplog.records  # silent by default
        hf_logging.set_verbosity_info()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=30, do_sample=False)
    finally:
        hf_logging.set_verbosity_warning()
    lines = [r.getMessage() for r in caplog.records if r.name == "transformers.dsg"]
    prompt_length = enc["input_ids"].shape[1]
    assert lines[0] == (
        f"DSG guardrail 'topic' (clamp) row 0: rho {prompt_rho:.4f}, tau {prompt_rho + 1e-6:.4f} "
        f"-> not fired after {prompt_length} tokens"
    )
    assert len(lines) == 2 and "-> FIRED after " in lines[1]
    assert int(lines[1].rsplit("after ", 1)[1].split()[0]) > prompt_length
