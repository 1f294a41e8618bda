"""Score "features" against score "window" on the rows `dsg build` can make.

`dsg demo` builds on prompt-shaped rows, one document per row (`--seq-len 256 --no-packing --max-docs 2048`, now
`dsg build`'s defaults too); the paper's rows pack documents into 1,024-token rows (`--packing --seq-len 1024
--max-docs 1024`, `dsg build`'s defaults before). The feature gate's fit takes one sample per row, so its rows
matter. For each row setting this script runs one statistics pass on the embedded default's corpora (the demo's
build split, its SAE and layer), then `dsg build`'s own selection and calibration for score "window" (the learned
token gate) and score "features" at each window and bound, the latter with its fit's samples cut at 256 row
positions (the default, `selection.FEATURE_GATE_SEGMENT`), 32, and 1,024 (whole rows), and scores every held-out
prompt in the three
formats (509 WMDP-bio, 341 MMLU-biology, 4,749 non-biology MMLU, 246 WikiText) from the calibration-size cache
with the guard's own arithmetic (`ActivationStore.guardrail_scores`).

Row settings: `default` (`dsg build` with no row flags), `packed` (the paper's), `packed-4096` (the same rows from
4,096 documents per corpus), `small` (tests/test_smollm2.py's build: every 4th forget and 12th retain text, 128-token
rows, 200 documents).

    python experiments/guard-v2/calibration-size/run.py --out /tmp/cs   # once: writes the statistics cache
    python experiments/guard-v2/feature-gate/build_rows.py --out experiments/guard-v2/feature-gate
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
sys.path.insert(0, str(HERE))

ROWS = {
    "default": {},
    "packed": dict(seq_len=1024, packing=True, max_docs=1024, heldout_fraction=0.2),
    "packed-4096": dict(seq_len=1024, packing=True, max_docs=4096, heldout_fraction=0.2),
    "small": dict(seq_len=128, packing=False, max_docs=200, heldout_fraction=0.1),
}
SMALL_STRIDES = (4, 12)  # the forget and retain strides of tests/test_smollm2.py's build


def main(argv=None):
    from run import line, meets_goals  # this folder's grid

    from modeling_dsg.analysis import selection
    from modeling_dsg.data.sources import load_base_model, load_sae, sae_layer
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.data import FORMATS
    from modeling_dsg.embedded.demo import default_sae
    from modeling_dsg.errors import DSGError
    from modeling_dsg.pipelines.build import BuildOptions, gather_statistics, select_and_calibrate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/dsg-calibration-size.pt", help="calibration-size/run.py's --cache")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 32])
    ap.add_argument(
        "--segments",
        type=int,
        nargs="+",
        default=[selection.FEATURE_GATE_SEGMENT, 32, 1024],
        help="the feature gate's fit samples: pieces of this many row positions (1024: whole rows of any setting)",
    )
    ap.add_argument(
        "--target-fprs", type=float, nargs="+", default=[0.02, 0.025, 0.03], help="besides dsg build's default rule"
    )
    args = ap.parse_args(argv)

    start = time.perf_counter()
    heldout = {k: s for k, s in torch.load(args.cache, weights_only=False).items() if isinstance(k, tuple)}
    base, tok = load_base_model(str(embedded.gguf_path()))
    sae = load_sae(str(default_sae()))
    forget_all, retain_all = embedded.forget_texts("build", tok), embedded.retain_texts("build", tok)
    results = []
    for rows_name in args.rows:
        forget, retain = forget_all, retain_all
        if rows_name == "small":
            forget, retain = forget_all[:: SMALL_STRIDES[0]], retain_all[:: SMALL_STRIDES[1]]
        for seed in args.seeds:
            options = BuildOptions(name="biology", batch_size=8, seed=seed, **ROWS[rows_name])
            pass_start = time.perf_counter()
            with torch.no_grad():
                statistics = gather_statistics(
                    base, tok, sae, forget, retain, options, str(default_sae()), sae_layer(sae)
                )
            pass_s = time.perf_counter() - pass_start
            stores = statistics.stores
            print(
                f"{rows_name} seed {seed}: forget {stores['forget'].n_rows} rows, retain {stores['retain'].n_rows} "
                f"rows, {pass_s:.0f} s",
                flush=True,
            )
            gates = [("window", None)] + [("features", segment) for segment in args.segments]
            for score, segment in gates:
                for window in args.windows:
                    for target in [None, *args.target_fprs]:
                        chosen = dataclasses.replace(options, score=score, window=window, target_fpr=target)
                        try:
                            if segment is not None:
                                selection.FEATURE_GATE_SEGMENT = segment  # read by fit_feature_gate
                            sel = select_and_calibrate(statistics, chosen)
                        except DSGError as err:  # too few retain rows to show this bound
                            print(f"{rows_name} s{seed} {score} window {window} bound {target}: {err}", flush=True)
                            continue
                        gate = {"features": sel.features, "score": score, "window": window, **sel.token_gate}
                        rho = {key: store.guardrail_scores(gate) for key, store in heldout.items()}
                        rates = {f"{n} {f}": float((r > sel.tau).double().mean()) for (n, f), r in rho.items()}
                        retain_rho = sel.rho["retain"]
                        row = {
                            "rows": rows_name,
                            "seed": seed,
                            "score": score,
                            "fit_segment": segment,
                            "window": window,
                            "target_fpr": target,  # None: dsg build's default rule
                            "n_features": len(sel.features),
                            "tau": sel.tau,
                            "rule": sel.rule,
                            "forget_rows": stores["forget"].n_rows,
                            "retain_rows": int(retain_rho.numel()),
                            "retain_fpr": float((retain_rho > sel.tau).double().mean()),
                            "retain_fpr_upper95": selection.clopper_pearson_upper(
                                int((retain_rho > sel.tau).sum()), int(retain_rho.numel())
                            ),
                            "rates": rates,
                            "auroc": {f: selection.auroc(rho[("bio", f)], rho[("mmlu_nonbio", f)]) for f in FORMATS},
                            "meets_goals": meets_goals(rates, FORMATS),
                            "statistics_s": pass_s,
                        }
                        results.append(row)
                        shown = {**row, "target_fpr": target if target is not None else float("nan")}
                        label = score if segment is None else f"{score} (fit on {segment})"
                        print(f"{rows_name} s{seed} {label:<20}" + line(shown, FORMATS), flush=True)
    record = {
        "command": "python experiments/guard-v2/feature-gate/build_rows.py " + " ".join(argv or sys.argv[1:]),
        "row_settings": {k: ROWS[k] for k in args.rows},
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build_rows.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
