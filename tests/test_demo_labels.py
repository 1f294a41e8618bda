"""`dsg demo` says what happened: "fired" at any point of the generation, "identical" only when it is."""

import tiny
import torch

from modeling_dsg.embedded import demo


def record(name, fired):
    return {"guardrail": name, "fired": torch.tensor([fired])}


def test_first_firing_on_the_prompt_or_at_a_new_token():
    assert demo._first_firing([record("bio", False), record("bio", False)]) is None
    assert demo._first_firing([record("bio", True), record("bio", True)]) == "bio on the prompt"
    later = [record("bio", False), record("cyber", False), record("bio", False), record("cyber", True)]
    assert demo._first_firing(later) == "cyber at new token 1"


def test_labels_compare_the_texts():
    assert demo._label(None, "a b", "a b") == "not fired; identical to base"
    assert demo._label(None, "a c", "a b") == "not fired; differs from base"
    assert demo._label("bio at new token 3", "x", "y") == "guardrail fired (bio at new token 3); differs from base"


class ChatTokenizer:
    """The tiny tokenizer behind the chat-template call the demo makes."""

    def __init__(self):
        self.tok = tiny.tiny_tokenizer()
        self.pad_token_id, self.eos_token_id = self.tok.pad_token_id, self.tok.eos_token_id

    def apply_chat_template(self, messages, **kwargs):
        return self.tok(messages[0]["content"], return_tensors="pt")

    def decode(self, ids, **kwargs):
        return self.tok.decode(ids, **kwargs)


def test_a_row_that_fires_during_decoding_is_reported_fired():
    model, reference = tiny.tiny_dsg(
        "llama", [tiny.guardrail("jumprelu", layer=1, threshold=0.9, clamp=60.0)], active_rate=0.2
    )
    tok = ChatTokenizer()
    prompt = "the history of the roman empire and its roads"
    text, fired = demo._generate(model, tok, prompt, 30)
    assert fired is None  # rho stays below 0.9 over the whole generation
    with model.guardrails_disabled():
        assert demo._generate(model, tok, prompt, 30) == (text, None)
    with torch.no_grad(), model.record_guardrails() as records:
        model(**tok.apply_chat_template([{"content": prompt}]))
    model.set_threshold(0, float(records[0]["rho"][0]) + 1e-6)  # just above the prompt's rho: fires later
    text2, fired2 = demo._generate(model, tok, prompt, 30)
    assert fired2 is not None and fired2.startswith("topic at new token ")
