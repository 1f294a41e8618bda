"""The shipped default guardrail (a `dsg demo` folder) per prompt format: held-out trigger rates and AUROC.

Every rate is the folder's own guardrail (features, token weights, window, tau) scored on stored activations,
which are exactly the guard's decisions (`ActivationStore.guardrail_scores`, as `benchmarks/build_cost.py`). The
held-out samples are `benchmarks/gate_formats.py`'s (400 per set), each in the three formats users send.

    python experiments/guard-v2/formats/run.py --model dsg-demo --out experiments/guard-v2/formats
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))


def main(argv=None):
    from gate_formats import heldout_sets, texts_in
    from safetensors.torch import load_file

    from modeling_dsg.analysis.selection import auroc
    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded import results
    from modeling_dsg.embedded.data import FORMATS, prompts_in
    from modeling_dsg.pipelines.attack import activation_store
    from modeling_dsg.pipelines.build import Statistics

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dsg-demo", help="a DSG folder built by `dsg demo` (full SAE)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=400, help="held-out prompts per set")
    args = ap.parse_args(argv)

    folder = Path(args.model)
    g = json.loads((folder / "config.json").read_text())["guardrails"][0]
    prefix = "guards.0.sae."
    sae_state = {
        k[len(prefix) :]: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith(prefix)
    }
    base, tok = load_base_model(str(embedded.gguf_path()))
    statistics = Statistics(g["layer"], g["sae"], sae_state, None, {}, None)
    heldout, wiki = heldout_sets(args.n)
    rho = {}
    for fmt in FORMATS:
        texts = {
            name: prompts_in(records, fmt, tok, "biology" if name != "mmlu_nonbio" else "general knowledge")
            for name, records in heldout.items()
        }
        texts["wikitext"] = texts_in(wiki, fmt, tok)
        for name, batch in texts.items():
            store = activation_store(base, tok, statistics, results._token_rows(tok, batch), f"{name} {fmt}", "cpu")
            rho[(name, fmt)] = store.guardrail_scores(g)
    tau = g["threshold"]
    record = {
        "model": str(folder),
        "tau": tau,
        "n": args.n,
        "rates": {f"{name} {fmt}": float((r > tau).double().mean()) for (name, fmt), r in rho.items()},
        "auroc_bio_vs_nonbio": {fmt: auroc(rho[("bio", fmt)], rho[("mmlu_nonbio", fmt)]) for fmt in FORMATS},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "formats.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| set | " + " | ".join(FORMATS) + " |", "|---|" + "---:|" * len(FORMATS)]
    for name in ("bio", "mmlu_bio", "mmlu_nonbio", "wikitext"):
        lines.append(f"| {name} | " + " | ".join(f"{record['rates'][f'{name} {fmt}']:.3f}" for fmt in FORMATS) + " |")
    lines.append(
        "| AUROC bio vs non-bio | " + " | ".join(f"{record['auroc_bio_vs_nonbio'][f]:.3f}" for f in FORMATS) + " |"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
