"""Place a DSG model with accelerate (`device_map`) and check it computes exactly what the plain load computes.

`--device-map offload` (default) keeps the first half of the decoder blocks on `--device` and puts the
second half and every guardrail on disk (`offload_folder`); `--device-map auto` lets accelerate place
everything within `--max-memory`. The guard is called as a module, so accelerate brings its SAE
weights in when the hooked layer runs. Run after `dsg demo`:

    python examples/device_map_offload.py --model dsg-demo --device-map offload
"""

import argparse
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompts", nargs="*", default=["Viruses enter host cells by", "The history of Rome is long"])
parser.add_argument("--model", default="dsg-demo", help="a DSG model folder or Hub id (default: ./dsg-demo)")
parser.add_argument("--device-map", choices=["offload", "auto"], default="offload")
parser.add_argument("--device", default="cpu", help='where the non-offloaded modules run, e.g. "cuda:0"')
parser.add_argument("--max-memory", default="200MB", help="--device-map auto: memory allowed on --device")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
tokenizer.padding_side = "left"
plain = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()


def offload_map(model, device):
    """A complete device map: the second half of the decoder blocks and all guardrails on "disk"."""
    blocks = [name for name, m in model.named_modules() if type(m).__name__ in model._no_split_modules]
    layers = [name for name in blocks if not name.startswith("guards.")]
    to_disk = set(layers[len(layers) // 2 :]) | {name for name in blocks if name.startswith("guards.")}
    device_map = {}

    def place(prefix, module):  # a module goes whole to one place unless something inside it goes to disk
        for name, child in module.named_children():
            full = prefix + name
            if full in to_disk:
                device_map[full] = "disk"
            elif any(d.startswith(full + ".") for d in to_disk):
                place(full + ".", child)
            else:
                device_map[full] = device

    place("", model)
    return device_map


with tempfile.TemporaryDirectory() as offload_folder:
    if args.device_map == "auto":
        device = int(args.device.split(":")[-1]) if args.device.startswith("cuda") else args.device
        kwargs = dict(device_map="auto", max_memory={device: args.max_memory})  # the rest goes to disk
    else:
        kwargs = dict(device_map=offload_map(plain, args.device))
    placed = AutoModelForCausalLM.from_pretrained(
        args.model, trust_remote_code=True, offload_folder=offload_folder, **kwargs
    ).eval()
    on_disk = [name for name, place in placed.hf_device_map.items() if place == "disk"]
    print(f"{len(placed.hf_device_map) - len(on_disk)} modules on {args.device}, on disk: {', '.join(on_disk)}")

    enc = tokenizer(args.prompts, return_tensors="pt", padding=True).to(args.device)
    with torch.no_grad(), plain.record_guardrails() as plain_rec:
        expected = plain(**enc).logits
    with torch.no_grad(), placed.record_guardrails() as placed_rec:
        logits = placed(**enc).logits

same_logits = torch.equal(logits.to(expected.device), expected)
same_decisions = all(torch.equal(a["fired"].cpu(), b["fired"].cpu()) for a, b in zip(plain_rec, placed_rec))
for record in placed_rec:
    print(f"guardrail {record['guardrail']!r} fired per prompt: {record['fired'].tolist()}")
print(f"logits identical to the plain load: {same_logits}; decisions identical: {same_decisions}")
sys.exit(0 if same_logits and same_decisions else 1)
