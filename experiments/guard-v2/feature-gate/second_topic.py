"""A second topic with a small corpus: the computer-security guardrail of `dsg results`' sequential section.

`dsg results` stacks a computer_security guardrail (the MMLU computer_security build questions as forget data, the
embedded retain texts without them as retain data, the demo's options and the paper's 95th percentile) on the
biology one. This script reruns that build's statistics pass on the base model (the guardrail layer's input is the
same: no guardrail edits before it) for two corpora, and scores each gate on every held-out prompt in the three
formats from the calibration-size cache (509 WMDP-bio, 44 computer_security and 4,705 other non-biology MMLU
questions, 246 WikiText paragraphs):

- `bare`: `dsg results`' corpora. The forget questions bare; the retain texts the plain embedded ones (WikiText,
  bare non-biology questions, WordNet glosses).
- `formats`: the demo's way. The forget questions in the three formats users send; the retain texts in the same
  formats (`retain_texts(tokenizer=...)`), without the computer_security questions in any format.

Gates: score "features" (the embedded default's), score "window" (learned points, `dsg build`'s default) at windows
8 and 32; tau from the 95th percentile of the retain rows (as `dsg results`) and from the default rule.

    python experiments/guard-v2/calibration-size/run.py --out /tmp/cs   # once: writes the statistics cache
    python experiments/guard-v2/feature-gate/second_topic.py --out experiments/guard-v2/feature-gate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "calibration-size"))

TOPIC = "computer_security"


def main(argv=None):
    from run import rows_subset  # calibration-size's

    from modeling_dsg.data.sources import load_base_model, load_sae, mcq_prompt, sae_layer
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.data import FORMATS
    from modeling_dsg.embedded.demo import DEMO_OPTIONS, default_sae
    from modeling_dsg.errors import DSGError
    from modeling_dsg.pipelines.build import BuildOptions, gather_statistics, select_and_calibrate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/dsg-calibration-size.pt", help="calibration-size/run.py's --cache")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    stores = torch.load(args.cache, weights_only=False)
    nonbio = embedded.mmlu_records("heldout", "nonbio")
    is_topic = torch.tensor([r["subject"] == TOPIC for r in nonbio])
    heldout = {}
    for fmt in FORMATS:
        heldout[("WMDP-bio", fmt)] = stores[("bio", fmt)]
        heldout[(TOPIC, fmt)] = rows_subset(stores[("mmlu_nonbio", fmt)], is_topic.nonzero().flatten())
        heldout[("other non-biology", fmt)] = rows_subset(
            stores[("mmlu_nonbio", fmt)], (~is_topic).nonzero().flatten()
        )
        heldout[("WikiText", fmt)] = stores[("wikitext", fmt)]
    base, tok = load_base_model(str(embedded.gguf_path()))
    sae = load_sae(str(default_sae()))
    records = [r for r in embedded.mmlu_records("build", "nonbio") if r["subject"] == TOPIC]
    corpora = {}
    forget = [mcq_prompt(r["question"], r["choices"]) for r in records]
    corpora["bare"] = (forget, [t for t in embedded.retain_texts("build") if t not in set(forget)])
    forget = embedded.formatted(records, "", tok)
    corpora["formats"] = (forget, [t for t in embedded.retain_texts("build", tok) if t not in set(forget)])
    base_options = BuildOptions(**{**DEMO_OPTIONS, "name": TOPIC, "target_fpr": None})
    gates = {
        "features, window 32": dict(score="features", window=32),
        "window (learned points), window 8": dict(score="window", window=8),
        "window (learned points), window 32": dict(score="window", window=32),
    }
    rules = {"P95": dict(threshold_percentile=95.0), "default rule": dict(threshold_percentile=None)}
    results = []
    for corpus, (forget, retain) in corpora.items():
        with torch.no_grad():
            statistics = gather_statistics(
                base, tok, sae, forget, retain, base_options, str(default_sae()), sae_layer(sae)
            )
        n_rows = {k: statistics.stores[k].n_rows for k in ("forget", "retain")}
        print(f"{corpus}: {len(forget)} forget texts, {len(retain)} retain texts, build rows {n_rows}", flush=True)
        for gate_name, gate_options in gates.items():
            for rule_name, rule in rules.items():
                options = dataclasses.replace(base_options, **gate_options, **rule)
                try:
                    sel = select_and_calibrate(statistics, options)
                except DSGError as err:
                    print(f"  {gate_name}, {rule_name}: {err}", flush=True)
                    continue
                gate = {"features": sel.features, "score": options.score, "window": options.window, **sel.token_gate}
                rates = {
                    f"{name} {fmt}": float((store.guardrail_scores(gate) > sel.tau).double().mean())
                    for (name, fmt), store in heldout.items()
                }
                row = {
                    "corpus": corpus,
                    "gate": gate_name,
                    "rule": rule_name,
                    "calibration": sel.rule,
                    "build_rows": n_rows,
                    "tau": sel.tau,
                    "features": sel.features,
                    "token_weights": sel.token_gate.get("token_weights"),
                    "rates": rates,
                }
                results.append(row)
                cells = "  ".join(
                    f"{name} " + "/".join(f"{rates[f'{name} {fmt}']:.3f}" for fmt in FORMATS)
                    for name in ("WMDP-bio", TOPIC, "other non-biology", "WikiText")
                )
                print(f"  {gate_name}, {rule_name} (tau {sel.tau:.3f}): {cells}", flush=True)
    record = {
        "command": "python experiments/guard-v2/feature-gate/second_topic.py " + " ".join(argv or sys.argv[1:]),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "second_topic.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
