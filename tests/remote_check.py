"""Run in a fresh interpreter that has never imported modeling_dsg: load saved DSG folders through
remote code, and dump logits, cached and uncached generations and a pipeline output for each."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

folders, out = sys.argv[1:-1], sys.argv[-1]
results = {}
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    tok.padding_side = "left"
    enc = tok(["the guard must hold", "short"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    cached = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False)
    pipe = pipeline("text-generation", model=folder, tokenizer=folder, trust_remote_code=True)
    text = pipe("hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    refusals = {}  # continuous batching packs several requests into one row: refused through remote code too
    for name, call in (
        ("generate_batch", lambda model=model: model.generate_batch([[1, 40, 41], [1, 50]], max_new_tokens=2)),
        ("init_continuous_batching", lambda model=model: model.init_continuous_batching()),
        (
            "packed",
            lambda model=model: model(
                input_ids=torch.tensor([[1, 40, 41, 1, 50]]), cu_seq_lens_q=torch.tensor([0, 3, 5])
            ),
        ),
    ):
        try:
            call()
            refusals[name] = None
        except ValueError as err:
            refusals[name] = str(err)
    results[folder] = {
        "refusals": refusals,
        "logits": logits,
        "cached": cached,
        "uncached": uncached,
        "pipeline": text,
        "class": type(model).__module__,
        "imported": "modeling_dsg" in sys.modules,
    }
torch.save(results, out)
print(json.dumps({f: r["class"] for f, r in results.items()}))
