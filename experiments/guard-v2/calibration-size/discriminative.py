"""Does another choice of features separate better? The paper's selection against features picked by an L1
logistic regression over every SAE feature's token activity (forget tokens against retain tokens), with and without
"negative" features (active on retain text: the learned token gate can weigh them below zero).

It reads the stores that `run.py` cached (`--cache`), takes the demo's 1,638 forget and 1,638 retain build rows,
fits the demo's token gate (window 8, points) on each feature set, and scores every held-out prompt in every format.

    python experiments/guard-v2/calibration-size/discriminative.py --out experiments/guard-v2/calibration-size
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from run import SETS, demo_gate, rows_subset


def activity(store):
    """[n_tokens, d_sae] sparse (CSR) 0/1: which features are active at each counted token."""
    nnz = (store.indptr[1:] - store.indptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(store.n_tokens), nnz)
    index = torch.stack([rows, store.feature_index.long()])
    ones = torch.ones(len(rows), dtype=torch.float32)
    return torch.sparse_coo_tensor(index, ones, (store.n_tokens, store.d_sae)).coalesce().to_sparse_csr()


def l1_logistic(forget, retain, l1: float):
    """Per-feature coefficients of a class-balanced logistic regression on token activity, L1-penalised."""
    xf, xr = activity(forget), activity(retain)
    beta = torch.zeros(forget.d_sae, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [beta, bias], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss_f = torch.nn.functional.softplus(-(xf @ beta.unsqueeze(1)).squeeze(1) - bias).mean()
        loss_r = torch.nn.functional.softplus((xr @ beta.unsqueeze(1)).squeeze(1) + bias).mean()
        loss = 0.5 * (loss_f + loss_r) + l1 * (beta.abs() + 1e-8).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return beta.detach()


def main(argv=None):
    from modeling_dsg.analysis import selection
    from modeling_dsg.embedded.data import FORMATS
    from modeling_dsg.embedded.demo import DEMO_OPTIONS
    from modeling_dsg.pipelines.build import BuildOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/dsg-calibration-size.pt", help="the stores run.py cached")
    ap.add_argument("--l1", type=float, default=1e-4)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    stores = torch.load(args.cache, weights_only=False)
    forget = rows_subset(stores["forget"], torch.arange(1638))
    retain = rows_subset(stores["retain"], torch.arange(1638))
    beta = l1_logistic(forget, retain, args.l1)
    stats = selection.FeatureStats.from_stores(forget, retain)
    build = BuildOptions(**DEMO_OPTIONS)
    paper = selection.select_dynamic(stats, build.n_features, build.ratio_percentile, build.importance_percentile)
    positive, negative = torch.argsort(beta, descending=True).tolist(), torch.argsort(beta).tolist()
    candidates = {
        "paper, N = 20 (the demo)": paper,
        "L1 logistic, top 20": positive[:20],
        "L1 logistic, top 40": positive[:40],
        "L1 logistic, top 20 + 10 negative": positive[:20] + negative[:10],
        "L1 logistic, top 30 + 10 negative": positive[:30] + negative[:10],
        "paper + 10 negative": paper + [f for f in negative if f not in paper][:10],
        "paper + 20 negative": paper + [f for f in negative if f not in paper][:20],
    }
    rows = []
    for name, features in candidates.items():
        gate = demo_gate(forget, retain, features, build.window)
        retain_rho = retain.guardrail_scores(gate)
        rho = {key: stores[key].guardrail_scores(gate) for key in stores if isinstance(key, tuple)}
        auroc = {f: selection.auroc(rho[("bio", f)], rho[("mmlu_nonbio", f)]) for f in FORMATS}
        for target in (0.02, 0.025, 0.03):
            tau = selection.calibrate_fpr(retain_rho, target)[0]
            rates = {f"{s} {f}": float((rho[(s, f)] > tau).double().mean()) for s in SETS for f in FORMATS}
            rows.append({"features": name, "n": len(features), "target_fpr": target, "tau": tau, "rates": rates})
            rows[-1]["auroc"] = auroc
            cells = " | ".join("/".join(f"{rates[f'{s} {f}']:.3f}" for f in FORMATS) for s in SETS)
            print(f"| {name} | {target:g} | {tau:.3f} | {cells} | {'/'.join(f'{auroc[f]:.4f}' for f in FORMATS)} |")
    record = {
        "command": f"python experiments/guard-v2/calibration-size/discriminative.py --out {args.out} --l1 {args.l1:g}",
        "active_coefficients": int((beta.abs() > 1e-3).sum()),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "discriminative.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
