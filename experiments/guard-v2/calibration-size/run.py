"""More build rows and more features against the precision / recall frontier of the demo's gate.

`dsg demo` balances its corpora to 2,048 rows each (`max_docs`), and 80% of them (1,638 rows) select the features,
fit the token gate and calibrate tau. The embedded data holds more of both: about 5,000 forget and 16,900 retain
texts in the three formats. This script collects the statistics of up to `--rows` rows per corpus once, then for
each (forget rows, retain rows, N, bound) runs the demo's own selection, token gate and calibration on the first
rows of that seeded order (the same 80% split the build keeps), and scores every held-out prompt in every format
(509 WMDP-bio, 341 MMLU-biology, 4,749 non-biology MMLU questions, 246 WikiText paragraphs).

    python experiments/guard-v2/calibration-size/run.py --out experiments/guard-v2/calibration-size

The held-out stores and the build stores are cached in `--cache` (torch.save) so a second run skips the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

SETS = ("bio", "mmlu_bio", "mmlu_nonbio", "wikitext")


def rows_subset(store, keep_rows):
    """The store restricted to the rows `keep_rows` (a sorted LongTensor of row indices), rows renumbered."""
    from modeling_dsg.analysis.stats import ActivationStore

    keep = torch.zeros(store.n_rows, dtype=torch.bool)
    keep[keep_rows] = True
    new_row = torch.full((store.n_rows,), -1, dtype=torch.long)
    new_row[keep_rows] = torch.arange(len(keep_rows))
    token_keep = keep[store.token_row.long()]
    nnz = store.indptr[1:] - store.indptr[:-1]
    entry_keep = torch.repeat_interleave(token_keep, nnz.long())
    feature_index, values = store.feature_index[entry_keep], store.values[entry_keep]
    indptr = torch.cat([store.indptr.new_zeros(1), nnz[token_keep].cumsum(0).to(store.indptr.dtype)])
    sums = torch.zeros(store.d_sae, dtype=torch.float64).index_add_(0, feature_index.long(), values.double())
    counts = torch.bincount(feature_index.long(), minlength=store.d_sae)
    return ActivationStore(
        d_sae=store.d_sae,
        n_rows=len(keep_rows),
        n_tokens=int(token_keep.sum()),
        feature_sums=sums,
        feature_counts=counts,
        row_token_counts=store.row_token_counts[keep_rows],
        token_row=new_row[store.token_row.long()][token_keep].to(store.token_row.dtype),
        token_pos=store.token_pos[token_keep],
        token_id=store.token_id[token_keep],
        indptr=indptr,
        feature_index=feature_index,
        values=values,
    )


def demo_gate(forget, retain, features, window: int) -> dict:
    """The demo's learned token gate (points, the window score) on `features`, fit on the two stores."""
    from modeling_dsg.analysis import selection

    weights, threshold = selection.fit_token_gate(forget, retain, features)
    return {
        "features": features,
        "score": "window",
        "window": window,
        "token_weights": weights,
        "token_threshold": threshold,
        "token_value": "points",
    }


def collect_stores(args):
    """Build stores (forget, retain: the build's 80% rows, in a seeded order) and held-out stores."""
    from gate_formats import demo_statistics, texts_in

    from modeling_dsg.data import rows as rows_mod
    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.data import FORMATS, prompts_in
    from modeling_dsg.embedded.demo import DEMO_OPTIONS
    from modeling_dsg.embedded.results import _token_rows
    from modeling_dsg.pipelines.attack import activation_store
    from modeling_dsg.pipelines.build import BuildOptions

    base, tok = load_base_model(str(embedded.gguf_path()))
    build = BuildOptions(**DEMO_OPTIONS)
    forget_texts, retain_texts = embedded.forget_texts("build", tok), embedded.retain_texts("build", tok)
    # a tiny statistics pass for the layer and the SAE's tensors (activation_store needs them)
    tiny = replace(build, max_docs=16)
    statistics = demo_statistics(base, tok, forget_texts[:64], retain_texts[:64], tiny)
    kw = dict(seq_len=build.seq_len, min_chars=build.min_chars, packing=build.packing, seed=build.seed)
    stores = {}
    for name, texts, seed in (("forget", forget_texts, build.seed), ("retain", retain_texts, build.seed + 1)):
        rows = rows_mod.build_rows(texts, tok, max_docs=args.rows, **kw)
        train, _ = rows_mod.split(rows, build.heldout_fraction, seed=seed)
        print(f"{name}: {len(texts)} texts, {len(rows)} rows, {len(train)} build rows", flush=True)
        stores[name] = activation_store(base, tok, statistics, train, name)
    records = {
        "bio": embedded.wmdp_records("heldout"),
        "mmlu_bio": embedded.mmlu_records("heldout", "bio"),
        "mmlu_nonbio": embedded.mmlu_records("heldout", "nonbio"),
    }
    wiki = embedded.wiki_paragraphs("heldout")
    for fmt in FORMATS:
        for name in SETS:
            if name == "wikitext":
                texts = texts_in(wiki, fmt, tok)
            else:
                texts = prompts_in(
                    records[name], fmt, tok, "biology" if name != "mmlu_nonbio" else "general knowledge"
                )
            stores[(name, fmt)] = activation_store(base, tok, statistics, _token_rows(tok, texts), f"{name} {fmt}")
    return stores


def main(argv=None):
    from modeling_dsg.analysis import selection
    from modeling_dsg.embedded.data import FORMATS
    from modeling_dsg.embedded.demo import DEMO_OPTIONS
    from modeling_dsg.pipelines.build import BuildOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/dsg-calibration-size.pt")
    ap.add_argument("--rows", type=int, default=8192, help="the most rows per corpus (before the 80%% split)")
    ap.add_argument("--forget-rows", type=int, nargs="+", default=[1638, 3276, 6553])
    ap.add_argument("--retain-rows", type=int, nargs="+", default=[1638, 3276, 6553])
    ap.add_argument("--n-features", type=int, nargs="+", default=[20, 30, 40])
    ap.add_argument("--target-fprs", type=float, nargs="+", default=[0.02, 0.025, 0.03])
    args = ap.parse_args(argv)

    start = time.perf_counter()
    cache = Path(args.cache)
    if cache.exists():
        stores = torch.load(cache, weights_only=False)
    else:
        stores = collect_stores(args)
        torch.save(stores, cache)
    collect_s = time.perf_counter() - start
    build = BuildOptions(**DEMO_OPTIONS)
    # the subset is exact: a gate's scores on the first rows equal the whole store's scores of those rows
    check = {"features": list(range(0, 4096, 97)), "score": "window", "window": build.window}
    head = rows_subset(stores["retain"], torch.arange(100))
    assert torch.equal(head.guardrail_scores(check), stores["retain"].guardrail_scores(check)[:100])
    rows = []
    for n_forget in args.forget_rows:
        forget = rows_subset(stores["forget"], torch.arange(min(n_forget, stores["forget"].n_rows)))
        for n_retain in args.retain_rows:
            retain = rows_subset(stores["retain"], torch.arange(min(n_retain, stores["retain"].n_rows)))
            stats = selection.FeatureStats.from_stores(forget, retain)
            for n in args.n_features:
                features = selection.select_dynamic(stats, n, build.ratio_percentile, build.importance_percentile)
                gate = demo_gate(forget, retain, features, build.window)
                retain_rho = retain.guardrail_scores(gate)
                rho = {key: stores[key].guardrail_scores(gate) for key in stores if isinstance(key, tuple)}
                for target in args.target_fprs:
                    tau = selection.calibrate_fpr(retain_rho, target)[0]
                    row = {
                        "forget_rows": forget.n_rows,
                        "retain_rows": retain.n_rows,
                        "n_features": n,
                        "target_fpr": target,
                        "tau": tau,
                        "retain_fpr": float((retain_rho > tau).double().mean()),
                        "rates": {f"{name} {fmt}": float((r > tau).double().mean()) for (name, fmt), r in rho.items()},
                        "auroc": {f: selection.auroc(rho[("bio", f)], rho[("mmlu_nonbio", f)]) for f in FORMATS},
                    }
                    rows.append(row)
                    print(line(row), flush=True)
    record = {
        "command": f"python experiments/guard-v2/calibration-size/run.py --out {args.out} --rows {args.rows}",
        "collect_s": collect_s,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration_size.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['seconds']:.0f} s")


def line(row) -> str:
    from modeling_dsg.embedded.data import FORMATS

    cells = " | ".join("/".join(f"{row['rates'][f'{name} {fmt}']:.3f}" for fmt in FORMATS) for name in SETS)
    auroc = "/".join(f"{row['auroc'][f]:.3f}" for f in FORMATS)
    return (
        f"| {row['forget_rows']} | {row['retain_rows']} | {row['n_features']} | {row['target_fpr']:g} | "
        f"{row['tau']:.3f} | {row['retain_fpr']:.3f} | {cells} | {auroc} |"
    )


if __name__ == "__main__":
    main()
