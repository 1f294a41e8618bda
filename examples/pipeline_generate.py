"""Generate with a DSG model through `pipeline("text-generation")`, several prompts in one padded batch.

The guardrail decides per prompt (padding never counts), so in one batch a forget-topic prompt can be
edited while the prompt next to it gets exactly the base model's output. Run after `dsg demo`:

    python examples/pipeline_generate.py --model dsg-demo "Viruses replicate by" "The capital of France is"
"""

import argparse

from transformers import pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompts", nargs="*", default=["Viruses replicate by", "The capital of France is"])
parser.add_argument("--model", default="dsg-demo", help="a DSG model folder or Hub id (default: ./dsg-demo)")
parser.add_argument("--max-new-tokens", type=int, default=30)
parser.add_argument("--device-map", default=None, help='e.g. "auto" to spread the model over the GPUs')
args = parser.parse_args()

generator = pipeline("text-generation", model=args.model, trust_remote_code=True, device_map=args.device_map)
generator.tokenizer.padding_side = "left"  # decoder-only models generate after the prompt, so pad on the left
if generator.tokenizer.pad_token is None:
    generator.tokenizer.pad_token = generator.tokenizer.eos_token

with generator.model.record_guardrails() as records:
    outputs = generator(
        args.prompts, batch_size=len(args.prompts), max_new_tokens=args.max_new_tokens, do_sample=False
    )

# one record per guardrail and forward; the last one holds each row's decision at the end of generation
final = {guard.name: [r for r in records if r["guardrail"] == guard.name][-1] for guard in generator.model.guards}
for i, out in enumerate(outputs):
    fired = [name for name, record in final.items() if record["fired"][i]]
    print(f"[{'fired: ' + ', '.join(fired) if fired else 'no guardrail fired'}] {out[0]['generated_text']!r}")
