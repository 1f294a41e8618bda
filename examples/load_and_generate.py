"""Load a DSG model with plain transformers and generate: DSG next to the base model, and which guardrail fired.

Needs no install of this project: the model folder carries its own code (`trust_remote_code=True`).
Run after `dsg demo` (which writes ./dsg-demo):

    python examples/load_and_generate.py --model dsg-demo --prompt "How do viruses enter a host cell?" --chat
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="dsg-demo", help="a DSG model folder or Hub id (default: ./dsg-demo)")
parser.add_argument("--prompt", default="The cell membrane is made of")
parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
parser.add_argument("--max-new-tokens", type=int, default=40)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()

if args.chat:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
else:
    inputs = tokenizer(args.prompt, return_tensors="pt")
inputs = inputs.to(model.device)
n_prompt = inputs["input_ids"].shape[1]


def generate():
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)


with model.guardrails_disabled():  # the same weights with every guardrail switched off: the base model
    base = generate()
with model.record_guardrails() as records:  # one record per guardrail and forward (prefill, then each new token)
    dsg = generate()

print(f"prompt: {args.prompt!r}")
print(f"base:   {base!r}")
print(f"DSG:    {dsg!r}")
for guard in model.guards:
    mine = [r for r in records if r["guardrail"] == guard.name]  # mine[0]: the prompt; then one per new token
    if mine[0]["fired"][0]:
        verdict = "fired on the prompt"
    elif mine[-1]["fired"][0]:
        verdict = "fired during generation (rho kept rising past tau)"
    else:
        verdict = "not fired: the DSG output is the base output"
    print(
        f"guardrail {guard.name!r} (layer {guard.layer}): rho on the prompt = {float(mine[0]['rho'][0]):.3f}, "
        f"tau = {guard.threshold:.3f} -> {verdict}"
    )
