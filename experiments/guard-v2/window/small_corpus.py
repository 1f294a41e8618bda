"""Window 8 against window 32 when the retain corpus is small, as `tests/test_smollm2.py`'s build is.

The build of that test (every 4th WMDP-bio/MMLU-biology build prompt and bio gloss, every 12th retain text,
`--max-docs 200 --heldout-fraction 0.1 --seq-len 128`: 180 retain rows for calibration), with `dsg build`'s
default gate at windows 8 and 32 and bounds 0.02 and 0.03, for seeds 0-3 (the sample and the split). With 180
rows a 0.02 bound lets no retain row fire, so tau is the largest retain rho; 0.03 lets one fire. Trigger rates on
the first 400 held-out prompts of each set (bare), from stored activations (exactly the guard's decisions).

    python experiments/guard-v2/window/small_corpus.py --out experiments/guard-v2/window
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def main(argv=None):
    from modeling_dsg.data.sources import load_base_model, load_sae, sae_layer
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.demo import default_sae
    from modeling_dsg.embedded.results import _token_rows
    from modeling_dsg.pipelines.attack import activation_store
    from modeling_dsg.pipelines.build import BuildOptions, gather_statistics, select_and_calibrate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = ap.parse_args(argv)

    base, tok = load_base_model(str(embedded.gguf_path()))
    sae = load_sae(str(default_sae()))
    forget = embedded.forget_texts("build")[::4]
    retain = embedded.retain_texts("build")[::12]
    held = embedded.heldout_prompts()
    rows = []
    for seed in args.seeds:
        options = BuildOptions(
            name="biology", seq_len=128, packing=False, max_docs=200, heldout_fraction=0.1, batch_size=16, seed=seed
        )
        with torch.no_grad():
            statistics = gather_statistics(base, tok, sae, forget, retain, options, str(default_sae()), sae_layer(sae))
        stores = {
            name: activation_store(base, tok, statistics, _token_rows(tok, held[name][:400]), name)
            for name in ("bio", "mmlu_nonbio", "wikitext")
        }
        for window in (8, 32):
            for target in (0.02, 0.03):
                sel = select_and_calibrate(statistics, dataclasses.replace(options, window=window, target_fpr=target))
                gate = {"features": sel.features, "score": "window", "window": window, **sel.token_gate}
                rates = {n: float((s.guardrail_scores(gate) > sel.tau).double().mean()) for n, s in stores.items()}
                row = {"seed": seed, "window": window, "target_fpr": target, "tau": sel.tau}
                row.update(retain_rows=int(sel.rho["retain"].numel()), rates=rates)
                rows.append(row)
                print(
                    f"seed {seed} window {window:>2} bound {target:g}: tau {sel.tau:.3f}, "
                    + ", ".join(f"{n} {r:.3f}" for n, r in rates.items()),
                    flush=True,
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/guard-v2/window/small_corpus.py --out " + args.out
    (out / "small_corpus.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
