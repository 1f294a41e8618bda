"""The runtime's typed values: the guardrails' running state (`GuardState`, `RefusalState`) on the KV cache
through every row operation of `generate`, the records and decisions that read as dicts, the one
decoder-block discovery, and public names only across the runtime's modules."""

import ast
from pathlib import Path

import pytest
import tiny
import torch
from torch import nn
from transformers import CLIPVisionConfig, DynamicCache, LlavaConfig, LlavaForConditionalGeneration

from modeling_dsg.errors import DSGError
from modeling_dsg.pipelines.train_sae import decoder_layers_path as train_sae_layers_path
from modeling_dsg.pipelines.train_sae import hook_name
from modeling_dsg.runtime.guard_dsg import GuardDecision, GuardRecord, GuardState, RefusalState
from modeling_dsg.runtime.modeling_dsg import GuardedCache, decoder_layers, decoder_layers_path

RUNTIME = Path(__file__).parent.parent / "modeling_dsg" / "runtime"
PROMPTS = ["cell virus gene protein plasmid enzyme", "the history of the roman empire and its roads", "x y"]
WINDOW = 3
# the keys of a record and of a decision before they were typed (dicts), in their order
RECORD_KEYS = ["guardrail", "index", "rho", "fired", "flags", "acts", "counted"]
DECISION_KEYS = ["fired", "rho", "action"]


def encode(texts):
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def window_model(threshold=0.4):
    g = tiny.guardrail("jumprelu", layer=1, threshold=threshold, clamp=60.0, features=(3, 7, 11))
    g.update(score="window", window=WINDOW)
    return tiny.tiny_dsg("llama", [g], active_rate=0.2)[0]


def refusing_model():
    g = tiny.guardrail("jumprelu", name="refuse", layer=2, threshold=0.0)
    g.update(
        action="refuse", refusal="no.", refusal_ids=tiny.tiny_tokenizer()("no.", add_special_tokens=False)["input_ids"]
    )
    return tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1), g], active_rate=0.2)[0]


def prefill(model, texts=PROMPTS):
    """One forward over `texts` into a fresh cache: (cache, records)."""
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad(), model.record_guardrails() as records:
        model(**encode(texts), cache=cache, use_cache=True)
    return cache, records


# -- the running state ------------------------------------------------------------------------------------
def test_state_after_a_forward_is_a_guard_state_with_the_documented_fields():
    model = window_model()
    cache, records = prefill(model)
    state, record = cache._dsg_state[0], records[0]
    batch = len(PROMPTS)
    assert type(state) is GuardState and GuardState._fields == ("flagged", "seen", "fired", "best", "tail")
    assert state.flagged.shape == state.seen.shape == state.fired.shape == state.best.shape == (batch,)
    assert state.flagged.dtype == state.seen.dtype == torch.long
    assert state.fired.dtype == torch.bool and state.best.dtype == torch.float64
    assert state.tail.shape == (batch, WINDOW - 1) and state.tail.dtype == torch.bool
    # the fields mean what the docstring says, checked against the record of the same call
    assert torch.equal(state.seen, record.counted.sum(-1))
    assert torch.equal(state.flagged, record.flags.sum(-1))
    assert torch.equal(state.fired, record.fired)
    assert bool((state.seen >= WINDOW).all()) and bool((state.best >= 0).all())  # a full window was seen
    assert torch.equal(record.rho, state.best)  # the "window" score: the best window so far
    for row in range(batch):  # the tail holds the row's last WINDOW - 1 counted flags, in order
        flags = record.flags[row][record.counted[row]]
        assert state.tail[row].tolist() == flags[-(WINDOW - 1) :].tolist()


def test_refusal_state_is_typed():
    model = refusing_model()
    cache, _ = prefill(model)
    refusal = cache._dsg_state["refusal"]
    assert type(refusal) is RefusalState and refusal._fields == ("written",)
    assert refusal.written.dtype == torch.long and refusal.written.tolist() == [1] * len(PROMPTS)  # all fired
    assert all(type(cache._dsg_state[i]) is GuardState for i in (0, 1))


def test_row_operations_keep_the_types_and_pick_the_rows():
    model = refusing_model()
    cache, _ = prefill(model)
    before = dict(cache._dsg_state)
    assert before[0].seen.unique().numel() == len(PROMPTS)  # the rows differ, so a wrong pick shows
    cache.batch_repeat_interleave(2)  # rows 0 0 1 1 2 2
    cache.reorder_cache(torch.tensor([5, 0, 2, 2, 1, 3]))  # rows 2 0 1 1 0 1
    cache.batch_select_indices(torch.tensor([0, 2]))  # rows 2 1
    picked = torch.tensor([2, 1])
    assert set(cache._dsg_state) == set(before)
    for key, state in cache._dsg_state.items():
        assert type(state) is type(before[key]) and type(state) in (GuardState, RefusalState)
        for name in type(state)._fields:
            assert torch.equal(getattr(state, name), getattr(before[key], name)[picked]), (key, name)


def test_beam_search_reorders_guard_states(monkeypatch):
    model = window_model(threshold=0.0)
    seen = []
    reorder = GuardedCache.reorder_cache

    def spy(self, beam_idx):
        reorder(self, beam_idx)
        seen.append([type(state) for state in self._dsg_state.values()])

    monkeypatch.setattr(GuardedCache, "reorder_cache", spy)
    with torch.no_grad():
        model.generate(**encode(PROMPTS[:2]), max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False)
    assert seen and all(types == [GuardState] for types in seen)


def test_the_guard_forward_takes_a_plain_tuple_and_returns_a_guard_state():
    model = window_model()
    guard = model.guards[0]
    hidden = torch.randn(2, 4, tiny.HIDDEN)
    counted = torch.ones(2, 4, dtype=torch.bool)
    initial = guard.initial_state(2, "cpu")
    assert type(initial) is GuardState
    with torch.no_grad():
        typed = guard(hidden, counted, initial)
        plain = guard(hidden, counted, tuple(initial))
    assert type(typed[1]) is GuardState and type(plain[1]) is GuardState
    for a, b in zip(typed[1], plain[1]):
        assert torch.equal(a, b)


# -- records and decisions ------------------------------------------------------------------------------
def test_a_record_reads_by_attribute_and_by_key():
    model = window_model()
    _, records = prefill(model)
    rec = records[0]
    assert type(rec) is GuardRecord
    assert list(rec.keys()) == RECORD_KEYS and list(rec) == RECORD_KEYS and len(rec) == len(RECORD_KEYS)
    for key in RECORD_KEYS:
        assert key in rec and rec[key] is getattr(rec, key) and rec.get(key) is getattr(rec, key)
    assert rec.rho is rec["rho"] and torch.equal(rec.rho, rec["rho"])
    assert rec["guardrail"] == "topic" and rec["index"] == 0
    assert rec["acts"].shape == (*rec["flags"].shape, 3)
    assert "missing" not in rec and rec.get("missing") is None and rec.get("missing", 7) == 7
    with pytest.raises(KeyError):
        rec["missing"]
    with pytest.raises(KeyError):
        rec[0]  # a key, as in a dict: not a position
    as_dict = dict(rec)
    assert list(as_dict) == RECORD_KEYS and all(as_dict[k] is rec[k] for k in RECORD_KEYS)
    assert rec == as_dict and {**rec} == as_dict and list(rec.values()) == [rec[k] for k in RECORD_KEYS]
    assert dict(rec.items()) == as_dict and rec != {**as_dict, "index": 1}


def test_decisions_read_by_attribute_and_by_key():
    model = window_model()
    with torch.no_grad():
        out = model(**encode(PROMPTS))
    decision = out.guardrail_decisions["topic"]
    assert type(out.guardrail_decisions) is dict and type(decision) is GuardDecision
    assert list(decision.keys()) == DECISION_KEYS
    assert decision.fired is decision["fired"] and decision.rho is decision["rho"]
    assert decision["action"] == decision.action == "clamp" and decision["fired"].dtype == torch.bool
    assert decision == {"fired": decision.fired, "rho": decision.rho, "action": "clamp"}


# -- decoder-block discovery ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "path"),
    [("llama", "model.layers"), ("gemma2", "model.layers"), ("qwen2", "model.layers"), ("mistral", "model.layers"),
     ("gpt2", "transformer.h")],
)  # fmt: skip
def test_decoder_layers_path_on_the_tiny_families(family, path):
    base = tiny.tiny_base(family)
    assert decoder_layers_path(base) == path == train_sae_layers_path(base)
    assert decoder_layers(base) is base.get_submodule(path) and len(decoder_layers(base)) == tiny.LAYERS
    assert hook_name(base, 2) == f"{path}.2"
    dsg = tiny.tiny_dsg(family)[0]  # the DSG wrapper holds the base model as `model`
    assert decoder_layers_path(dsg) == f"model.{path}" and decoder_layers(dsg) is dsg.model.get_submodule(path)


class TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))


class Multimodal(nn.Module):
    """Layers at `model.language_model.layers`, with no `get_decoder` and no `base_model` to lead to them."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.vision = nn.ModuleList([nn.Linear(2, 2)])
        self.model.language_model = TextModel()


def test_decoder_layers_path_at_model_language_model_layers():
    model = Multimodal()
    assert decoder_layers_path(model) == "model.language_model.layers" == train_sae_layers_path(model)
    assert decoder_layers(model) is model.model.language_model.layers
    assert hook_name(model, 1) == "model.language_model.layers.1"


def test_decoder_layers_path_of_a_transformers_multimodal_model():
    """Llava's layers are found from its decoder (`get_decoder()`) and named from the model's root."""
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(text_config=tiny.FAMILIES["llama"]().to_dict(), vision_config=vision.to_dict())
    )
    assert decoder_layers_path(model) == "model.language_model.layers" == train_sae_layers_path(model)
    assert decoder_layers(model) is model.model.language_model.layers


def test_no_decoder_layers_keeps_both_errors():
    with pytest.raises(
        ValueError, match=r"cannot find the decoder layers of Linear \(tried layers, h, .*language_model"
    ):
        decoder_layers_path(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(nn.Linear(2, 2))
    with pytest.raises(DSGError, match=r"^cannot find the decoder layers of Linear$"):
        train_sae_layers_path(nn.Linear(2, 2))
    empty = nn.Module()
    empty.layers = nn.ModuleList()  # an empty list is not the decoder
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        decoder_layers_path(empty)


# -- module boundaries ----------------------------------------------------------------------------------
def private_imports(source: str) -> list[str]:
    return [
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__future__" and node.module != "__future__"
    ]


def test_no_runtime_module_imports_a_private_name():
    assert private_imports("from .guard_dsg import _CALL, DSGGuard\n") == ["_CALL"]  # the check can fail
    for path in sorted(RUNTIME.glob("*.py")):
        assert private_imports(path.read_text()) == [], path.name
