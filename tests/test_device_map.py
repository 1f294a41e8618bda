"""accelerate placement: CPU + disk offload, device_map="auto", and a bf16 base with an fp32 guard."""

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from modeling_dsg import DSGForCausalLM

PROMPTS = ["the cell membrane", "history of the roman empire is long", "viruses replicate inside host cells"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.save_tiny_dsg(
        tmp_path_factory.mktemp("dm") / "m", guardrails=[tiny.guardrail("jumprelu", layer=2, threshold=0.2)]
    )


@pytest.fixture(scope="module")
def reference(folder):
    model = DSGForCausalLM.from_pretrained(folder).eval()
    enc = tiny.tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as rec:
        logits = model(**enc).logits
    assert rec[0]["fired"].any()
    return enc, logits, rec[0]["fired"]


@pytest.mark.parametrize("guard_key", ["guards", "guards.0"])
def test_cpu_and_disk_offload_is_identical(folder, reference, tmp_path, guard_key):
    enc, logits, fired = reference
    device_map = {
        "model.model.embed_tokens": "cpu",
        "model.model.layers.0": "cpu",
        "model.model.layers.1": "cpu",
        "model.model.layers.2": "disk",
        "model.model.layers.3": "disk",
        "model.model.norm": "cpu",
        "model.model.rotary_emb": "cpu",
        "model.lm_head": "cpu",
        guard_key: "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert model.guards[0].sae.W_enc.device.type == "meta"  # really offloaded
    with torch.no_grad(), model.record_guardrails() as rec:
        out = model(**enc).logits
    assert torch.equal(out, logits)
    assert torch.equal(rec[0]["fired"], fired)
    generated = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert generated.shape == (len(PROMPTS), enc["input_ids"].shape[1] + 4)


def test_device_map_auto_with_forced_offload(folder, reference, tmp_path):
    enc, logits, fired = reference
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "off"
    ).eval()
    assert "disk" in set(model.hf_device_map.values())
    with torch.no_grad(), model.record_guardrails() as rec:
        out = model(**enc).logits
    assert torch.equal(out, logits) and torch.equal(rec[0]["fired"], fired)


def test_bf16_base_keeps_an_fp32_guard(folder, reference):
    enc, logits, fired = reference
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.guards[0].sae.W_enc.dtype == torch.float32
    assert model.guards[0].tau.dtype in (torch.float32, torch.float64)  # decisions use the config float
    with torch.no_grad(), model.record_guardrails() as rec:
        out = model(**enc).logits
    with torch.no_grad(), model.guardrails_disabled():
        base = model(**enc).logits
    assert out.dtype == torch.bfloat16
    for row in range(len(PROMPTS)):  # unfired rows equal the bf16 base exactly
        if not rec[0]["fired"][row]:
            assert torch.equal(out[row], base[row])
    assert (out.float() - logits).abs().max() < 0.1  # bf16 rounding only
