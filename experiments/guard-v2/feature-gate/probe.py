"""How well the SAE separates biology from other questions when a classifier sees all of a prompt's features.

The previous default's gate reaches an AUROC of 0.993-0.997 (WMDP-bio against non-biology MMLU) under every lever
tried. Is that the SAE, or the gate? Here a class-balanced L2 logistic regression (`selection.balanced_logistic`)
sees, for each whole build row, which of all 4,096 features are active anywhere in it (`row_activity`), fit on a
seeded 60% of the demo's forget and retain build rows; tau is calibrated on the other 40% of the retain rows at a
0.02 Clopper-Pearson bound, and every held-out prompt in the three formats is scored. No streaming guard computes
this (it needs the whole encoder and the whole prompt); it measures what the SAE holds.

    python experiments/guard-v2/feature-gate/probe.py --out experiments/guard-v2/feature-gate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "calibration-size"))


def main(argv=None):
    from run import rows_subset  # calibration-size's

    from modeling_dsg.analysis import selection
    from modeling_dsg.embedded.data import FORMATS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/dsg-calibration-size.pt", help="calibration-size/run.py's --cache")
    ap.add_argument("--rows", type=int, default=1638, help="forget and retain build rows (dsg demo's)")
    ap.add_argument("--l2", type=float, default=1e-2)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    stores = torch.load(args.cache, weights_only=False)
    x = {"forget": rows_subset(stores["forget"], torch.arange(args.rows)).row_activity().double()}
    x["retain"] = rows_subset(stores["retain"], torch.arange(args.rows)).row_activity().double()
    heldout = {key: store.row_activity().double() for key, store in stores.items() if isinstance(key, tuple)}
    gen = torch.Generator().manual_seed(0)
    order = {name: torch.randperm(len(v), generator=gen) for name, v in x.items()}
    fit = {name: order[name][: int(0.6 * len(x[name]))] for name in x}
    calibration = order["retain"][int(0.6 * len(x["retain"])) :]
    features = torch.cat([x["forget"][fit["forget"]], x["retain"][fit["retain"]]])
    labels = torch.cat([torch.ones(len(fit["forget"])), torch.zeros(len(fit["retain"]))]).double()
    mean, std = features.mean(0), features.std(0) + 1e-3
    beta = selection.balanced_logistic((features - mean) / std, labels, args.l2)

    def logit(v):
        return ((v - mean) / std) @ beta

    calibration_logits = logit(x["retain"][calibration])
    # a monotone map of the logits into (0, 1), as calibrate_fpr expects scores at most 1
    tau, info = selection.calibrate_fpr(torch.sigmoid(calibration_logits), 0.02)
    rho = {key: torch.sigmoid(logit(v)) for key, v in heldout.items()}
    rates = {f"{name} {fmt}": float((r > tau).double().mean()) for (name, fmt), r in rho.items()}
    record = {
        "command": "python experiments/guard-v2/feature-gate/probe.py " + " ".join(argv or sys.argv[1:]),
        "rows": args.rows,
        "l2": args.l2,
        "calibration_rows": len(calibration),
        "calibration_fpr_upper95": info["fpr_upper"],
        "rates": rates,
        "auroc": {f: selection.auroc(rho[("bio", f)], rho[("mmlu_nonbio", f)]) for f in FORMATS},
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("auroc", "rates", "calibration_fpr_upper95", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
