"""The same held-out prompts scored by a guard with and without SmolLM2's BOS (<|im_start|>) in front: the check behind
the formats README's calibration note. Run: python experiments/guard-v2/formats/bos_check.py DEMO_FOLDER (the note
used the folder of the previous demo, calibrated on BOS-first rows)."""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_dsg.analysis.decisions import guard_decisions
from modeling_dsg.embedded import data as E
from modeling_dsg.embedded.data import seeded_sample

m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
q = E.mmlu_records("heldout", "nonbio")
texts = seeded_sample(E.prompts_in(q, "bare"), 600, 7) + seeded_sample(E.wiki_paragraphs("heldout"), 200, 8)
b = seeded_sample(E.prompts_in(E.wmdp_records("heldout"), "bare"), 300, 9)
for name, t in [("retain", texts), ("bio", b)]:
    a = guard_decisions(m, tok, t, desc="plain")["biology"]
    c = guard_decisions(m, tok, ["<|im_start|>" + x for x in t], desc="bos")["biology"]
    print(
        name,
        "no BOS",
        a["fired"].double().mean().item(),
        "BOS",
        c["fired"].double().mean().item(),
        "rho mean",
        a["rho"].mean().item(),
        c["rho"].mean().item(),
        flush=True,
    )
