"""The default gate's window and bound, measured on the whole held-out pools in every prompt format.

One statistics pass with `dsg demo`'s options (`DEMO_OPTIONS`), then for each window and target FPR the demo's own
selection, token gate and calibration (`select_and_calibrate`), scored on every held-out prompt of the embedded
data (509 WMDP-bio, 341 MMLU-biology, 4,749 non-biology MMLU questions and 246 WikiText paragraphs), each in the
three formats users send (bare, lm-eval preamble, chat template). Rates are the guard's own decisions, computed from
stored activations (`ActivationStore.guardrail_scores`). It also lists the non-biology MMLU subjects the chosen
gates fire on.

    python experiments/guard-v2/window/run.py --out experiments/guard-v2/window
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

SETS = ("bio", "mmlu_bio", "mmlu_nonbio", "wikitext")


def main(argv=None):
    from gate_formats import demo_statistics, texts_in

    from modeling_dsg.analysis.selection import auroc
    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.data import FORMATS, prompts_in
    from modeling_dsg.embedded.demo import DEMO_OPTIONS
    from modeling_dsg.embedded.results import _token_rows
    from modeling_dsg.pipelines.attack import activation_store
    from modeling_dsg.pipelines.build import BuildOptions, select_and_calibrate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 6, 8, 12, 16, 32])
    ap.add_argument("--target-fprs", type=float, nargs="+", default=[0.02, 0.025, 0.03])
    args = ap.parse_args(argv)

    start = time.perf_counter()
    base, tok = load_base_model(str(embedded.gguf_path()))
    build = BuildOptions(**DEMO_OPTIONS)
    forget, retain = embedded.forget_texts("build", tok), embedded.retain_texts("build", tok)
    statistics = demo_statistics(base, tok, forget, retain, build)
    records = {
        "bio": embedded.wmdp_records("heldout"),
        "mmlu_bio": embedded.mmlu_records("heldout", "bio"),
        "mmlu_nonbio": embedded.mmlu_records("heldout", "nonbio"),
    }
    wiki = embedded.wiki_paragraphs("heldout")
    stores = {}
    for fmt in FORMATS:
        for name in SETS:
            if name == "wikitext":
                texts = texts_in(wiki, fmt, tok)
            else:
                topic = "biology" if name != "mmlu_nonbio" else "general knowledge"
                texts = prompts_in(records[name], fmt, tok, topic)
            stores[(name, fmt)] = activation_store(base, tok, statistics, _token_rows(tok, texts), f"{name} {fmt}")
    subjects = [r["subject"] for r in records["mmlu_nonbio"]]

    rows = []
    for window in args.windows:
        for target in args.target_fprs:
            options = replace(build, window=window, target_fpr=target)
            sel = select_and_calibrate(statistics, options)
            gate = {"features": sel.features, "score": options.score, "window": window, **sel.token_gate}
            retain = sel.rho["retain"]
            row = {
                "window": window,
                "target_fpr": target,
                "tau": sel.tau,
                "retain_rows": int(retain.numel()),
                "retain_fpr": float((retain > sel.tau).double().mean()),
                "build_heldout_retain_fpr": float((sel.rho["heldout retain"] > sel.tau).double().mean()),
                "rates": {},
                "auroc": {},
                "fired_nonbio_subjects": collections.Counter(),
            }
            rho = {key: store.guardrail_scores(gate) for key, store in stores.items()}
            for (name, fmt), r in rho.items():
                row["rates"][f"{name} {fmt}"] = float((r > sel.tau).double().mean())
            for fmt in FORMATS:
                row["auroc"][fmt] = auroc(rho[("bio", fmt)], rho[("mmlu_nonbio", fmt)])
                fired = (rho[("mmlu_nonbio", fmt)] > sel.tau).tolist()
                row["fired_nonbio_subjects"].update(s for s, f in zip(subjects, fired) if f)
            row["fired_nonbio_subjects"] = dict(row["fired_nonbio_subjects"].most_common())
            rows.append(row)
            print(line(row), flush=True)
    record = {
        "command": "python experiments/guard-v2/window/run.py --out " + args.out,
        "options": {k: v for k, v in DEMO_OPTIONS.items() if k not in ("window", "target_fpr")},
        "pools": {**{name: len(r) for name, r in records.items()}, "wikitext": len(wiki)},
        "nonbio_subjects": dict(collections.Counter(subjects).most_common()),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "window.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['seconds']:.0f} s")


def line(row) -> str:
    from modeling_dsg.embedded.data import FORMATS

    cells = " | ".join("/".join(f"{row['rates'][f'{name} {fmt}']:.3f}" for fmt in FORMATS) for name in SETS)
    return (
        f"| {row['window']} | {row['target_fpr']:g} | {row['tau']:.3f} | {row['retain_fpr']:.3f} | "
        f"{row['build_heldout_retain_fpr']:.3f} | {cells} |"
    )


if __name__ == "__main__":
    main()
