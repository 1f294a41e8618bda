"""Five base families: save, reload through remote code in a fresh process, generate, pipeline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from transformers import pipeline

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    models = {}
    for family in tiny.FAMILIES:
        # threshold 0.3 with ~12% per-feature firing: some rows fire, some do not.
        model, _ = tiny.tiny_dsg(family, [tiny.guardrail("jumprelu", layer=2, threshold=0.3)])
        model.save_pretrained(root / family)
        tiny.tiny_tokenizer().save_pretrained(root / family)
        models[family] = model
    return root, models


@pytest.fixture(scope="module")
def remote(saved, tmp_path_factory):
    root, _ = saved
    out = tmp_path_factory.mktemp("remote") / "results.pt"
    folders = [str(root / family) for family in tiny.FAMILIES]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, str(HERE / "remote_check.py"), *folders, str(out)],
        cwd=tmp_path_factory.mktemp("cwd"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_remote_code_reload_is_exact(saved, remote, family):
    root, models = saved
    result = remote[str(root / family)]
    assert result["class"].startswith("transformers_modules."), result["class"]
    assert result["imported"] is False  # the fresh process never imported the package
    tok = tiny.tiny_tokenizer()
    tok.padding_side = "left"
    enc = tok(["the guard must hold", "short"], return_tensors="pt", padding=True)
    with torch.no_grad():
        local = models[family](**enc).logits
    assert torch.equal(result["logits"], local)


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_continuous_batching_is_refused_through_remote_code(remote, saved, family):
    root, _ = saved
    refusals = remote[str(root / family)]["refusals"]
    assert "continuous batching" in refusals["generate_batch"]
    assert "continuous batching" in refusals["init_continuous_batching"]
    assert "packed inputs" in refusals["packed"]


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_generate_with_and_without_cache_agree(remote, saved, family):
    root, _ = saved
    result = remote[str(root / family)]
    assert torch.equal(result["cached"], result["uncached"])
    assert result["cached"].shape[1] > 2
    assert isinstance(result["pipeline"], str) and result["pipeline"].startswith("hello")


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_pipeline_with_model_object(saved, family):
    _, models = saved
    pipe = pipeline("text-generation", model=models[family], tokenizer=tiny.tiny_tokenizer())
    out = pipe(["first prompt", "a second, longer prompt"], max_new_tokens=4, do_sample=False)
    assert [o[0]["generated_text"][:12] for o in out] == ["first prompt", "a second, lo"]
