"""Integration tests on the real SmolLM2-135M-Instruct from the shared folder (GGUF, cached conversion)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from modeling_dsg import DSGConfig, DSGForCausalLM
from modeling_dsg.data.sources import load_base_model
from modeling_dsg.embedded import data as embedded

pytestmark = pytest.mark.integration

PROMPTS = ["The cell membrane is made of", "Paris is the capital of", "Viruses replicate by"]


@pytest.fixture(scope="module", autouse=True)
def _all_threads(_one_thread_for_tiny_models):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_base_model(str(embedded.gguf_path()))
    tokenizer.padding_side = "left"
    return model, tokenizer


@pytest.fixture(scope="module")
def wrapped(smollm2):
    """SmolLM2 with a random (untrained) TopK guard at layer 6 whose threshold splits PROMPTS."""
    base, tokenizer = smollm2
    hidden = base.config.hidden_size
    guardrail = {
        "name": "random",
        "layer": 6,
        "features": list(range(0, 400, 20)),
        "clamp": 50.0,
        "threshold": 0.0,
        "sae": {"architecture": "topk", "d_in": hidden, "d_sae": 1024, "k": 32},
    }
    config = DSGConfig(text_config=base.config.to_dict(), guardrails=[guardrail])
    model = DSGForCausalLM(config, base_model=base).eval()
    model.generation_config = base.generation_config
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae = model.guards[0].sae
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=gen) / hidden**0.5)
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=gen) / hidden**0.5)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as rec:
        model(**enc)
    rho = rec[0]["rho"].sort().values
    model.set_threshold(0, float(rho[0] + rho[1]) / 2)  # the lowest-rho prompt does not fire, the others do
    return model, tokenizer


def test_unfired_rows_identical_to_base(wrapped):
    model, tokenizer = wrapped
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), model.record_guardrails() as rec:
        logits = model(**enc).logits
    with torch.no_grad(), model.guardrails_disabled():
        base = model(**enc).logits
    fired = rec[0]["fired"]
    assert fired.sum() == len(PROMPTS) - 1
    for row in range(len(PROMPTS)):
        assert torch.equal(logits[row], base[row]) == (not fired[row])


def test_round_trip_through_remote_code_and_generate(wrapped, tmp_path):
    model, tokenizer = wrapped
    folder = tmp_path / "smollm2-dsg"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "t.padding_side = 'left'\n"
        f"enc = t({PROMPTS!r}, return_tensors='pt', padding=True)\n"
        "with torch.no_grad(): logits = m(**enc).logits\n"
        "out = m.generate(**enc, max_new_tokens=8, do_sample=False)\n"
        "torch.save({'logits': logits, 'out': out, 'imported': 'modeling_dsg' in sys.modules}, "
        f"{str(tmp_path / 'r.pt')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "r.pt")
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert result["imported"] is False
    assert torch.equal(result["logits"], logits)
    assert torch.equal(result["out"], out)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8


def test_build_with_shipped_sae_reload_and_fire_on_biology(tmp_path):
    """Build a biology guardrail on real SmolLM2 with the shipped SAE (small corpora for speed), reload it
    through remote code in a fresh process, and check held-out biology prompts fire more than WikiText."""
    from modeling_dsg.data.sources import load_sae, sae_layer
    from modeling_dsg.embedded.demo import default_sae
    from modeling_dsg.pipelines.build import BuildOptions, assemble, build_guardrail, write_folder

    base, tokenizer = load_base_model(str(embedded.gguf_path()))  # a fresh copy: no other test's guard on it
    sae = load_sae(str(default_sae()))
    # the demo's corpora (every question in the three formats users send), thinned
    forget = embedded.forget_texts("build", tokenizer)[::4]
    retain = embedded.retain_texts("build", tokenizer)[::12]
    options = BuildOptions(
        name="biology", seq_len=128, packing=False, max_docs=200, heldout_fraction=0.1, batch_size=16
    )
    result = build_guardrail(
        base, tokenizer, sae, forget, retain, options, sae_source=str(default_sae()), sae_layer=sae_layer(sae)
    )
    model = assemble(base, tokenizer, [result])
    folder = tmp_path / "smollm2-bio"
    write_folder(model, tokenizer, folder, [result], "HuggingFaceTB/SmolLM2-135M-Instruct")
    held = embedded.heldout_prompts()
    bio, wiki = held["bio"][:40], held["wikitext"][:40]
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "rates = {}\n"
        f"for name, texts in json.loads({json.dumps(json.dumps({'bio': bio, 'wiki': wiki}))}).items():\n"
        "    fired = []\n"
        "    for text in texts:\n"
        "        enc = t(text, return_tensors='pt', truncation=True, max_length=256)\n"
        "        with torch.no_grad(), m.record_guardrails() as rec:\n"
        "            m(**enc)\n"
        "        fired.append(bool(rec[0]['fired'][0]))\n"
        "    rates[name] = sum(fired) / len(fired)\n"
        "print(json.dumps({'rates': rates, 'imported': 'modeling_dsg' in sys.modules}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_json = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result_json["imported"] is False
    rates = result_json["rates"]
    assert rates["bio"] > rates["wiki"], rates
    assert rates["bio"] >= 0.5, rates
