"""A built model folder's own guardrail on every held-out prompt in every format.

Scores the guardrail in `--model`'s config.json (its features, score, window, weights and tau, exactly as the guard
decides: `ActivationStore.guardrail_scores`) on the held-out stores of the calibration-size statistics cache: 509
WMDP-bio, 341 MMLU-biology, 4,749 non-biology MMLU questions and 246 WikiText paragraphs, each bare, with the lm-eval
preamble and through the chat template. The stores hold the base model's SAE activations, which no gate changes, so
any folder built on the embedded default's SAE and layer can be scored from them.

    python experiments/guard-v2/feature-gate/folder_rates.py --model dsg-demo --name demo \
        --out experiments/guard-v2/feature-gate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None):
    from modeling_dsg.analysis import selection
    from modeling_dsg.embedded.data import FORMATS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a DSG folder built on the embedded default's SAE")
    ap.add_argument("--name", required=True, help="the name of this folder in folder_rates.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/dsg-calibration-size.pt", help="calibration-size/run.py's --cache")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    (guardrail,) = json.loads((Path(args.model) / "config.json").read_text())["guardrails"]
    stores = torch.load(args.cache, weights_only=False)
    rho = {key: store.guardrail_scores(guardrail) for key, store in stores.items() if isinstance(key, tuple)}
    tau = guardrail["threshold"]
    record = {
        "guardrail": {k: guardrail.get(k) for k in ("score", "window", "features", "token_weights", "threshold")},
        "rates": {f"{name} {fmt}": float((r > tau).double().mean()) for (name, fmt), r in rho.items()},
        "n": {f"{name} {fmt}": int(r.numel()) for (name, fmt), r in rho.items()},
        "auroc": {f: selection.auroc(rho[("bio", f)], rho[("mmlu_nonbio", f)]) for f in FORMATS},
        "seconds": time.perf_counter() - start,
        "command": "python experiments/guard-v2/feature-gate/folder_rates.py " + " ".join(argv or sys.argv[1:]),
    }
    path = Path(args.out) / "folder_rates.json"
    everything = json.loads(path.read_text()) if path.exists() else {}
    everything[args.name] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(everything, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("rates", "auroc")}, indent=1))


if __name__ == "__main__":
    main()
