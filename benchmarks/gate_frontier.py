"""The embedded default's gates: precision against robustness, calibrated by percentile and by a target FPR.

One statistics pass (the demo's build: SmolLM2-135M-Instruct, the shipped SAE, N = 20, c = 3), then `dsg sweep`'s
machinery (`pipelines.sweep.sweep_model`) over the gate axes: score fraction and window 8 / 16 / 32, tau from the
95th percentile of retain rho (the paper's rule) or from a one-sided 95% Clopper-Pearson bound on the retain firing
rate at most 0.02 or 0.05 (`--target-fpr`), with the dilution attack at every gate (`--dilution`: held-out WMDP-bio
letter prompts, the held-out non-biology questions as filler, in front / after / between the halves, 1x-10x).
Beside the sweep's numbers, each gate's trigger rates on the held-out prompt sets of `dsg results` (400 per set,
decisions from stored activations, exactly the guard's).

    python benchmarks/gate_frontier.py --out experiments/gate-frontier
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/gate-frontier")
    ap.add_argument("--questions", type=int, default=100, help="held-out questions per set (scores, dilution)")
    ap.add_argument("--heldout", type=int, default=400, help="held-out prompts per set for trigger rates")
    ap.add_argument("--from-json", action="store_true", help="only print the table of OUT/frontier.json")
    args = ap.parse_args(argv)
    if args.from_json:
        print("\n".join(table(json.loads((Path(args.out) / "frontier.json").read_text())["rows"])))
        return 0

    from gate_formats import demo_statistics

    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.data import seeded_sample
    from modeling_dsg.embedded.demo import DEMO_OPTIONS
    from modeling_dsg.embedded.results import _mcq, _token_rows
    from modeling_dsg.evaluation.report import clean_json
    from modeling_dsg.pipelines.attack import activation_store, fired
    from modeling_dsg.pipelines.build import BuildOptions, assemble
    from modeling_dsg.pipelines.sweep import SweepOptions, gate_label, sweep_model, write_outputs

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_base_model(str(embedded.gguf_path()))
    build = BuildOptions(**DEMO_OPTIONS)
    statistics = demo_statistics(base, tok, embedded.forget_texts("build"), embedded.retain_texts("build"), build)
    options = SweepOptions(
        modes=("dynamic",),
        n_features=(build.n_features,),
        clamps=(build.clamp,),
        ratio_percentiles=(build.ratio_percentile,),
        metric="cloze_prob",
        limit=None,
        scores=("fraction", "window"),
        windows=(8, 16, 32),
        threshold_percentiles=(95.0,),
        target_fprs=(0.02, 0.05),
        dilution=args.questions,
        batch_size=build.batch_size,
        build=build,
    )
    forget = _mcq(seeded_sample(embedded.wmdp_records("heldout"), args.questions, 11), "WMDP-bio", "forget")
    retain = _mcq(
        seeded_sample(embedded.mmlu_records("heldout", "nonbio"), args.questions, 11), "MMLU non-bio", "retain"
    )
    with torch.no_grad():
        result = sweep_model(assemble(base, tok, []), tok, statistics, forget, retain, options)
    stores = {
        name: activation_store(
            base, tok, statistics, _token_rows(tok, seeded_sample(prompts, args.heldout, 0)), f"held-out {name}"
        )
        for name, prompts in embedded.heldout_prompts().items()
    }
    rows = []
    for p in result["points"]:
        if "error" in p:  # a gate the calibration refuses (e.g. tau would be 1: it would never fire)
            rows.append({"gate": gate_label(p), "error": p["error"]})
            continue
        g = {"features": p["features"], "threshold": p["tau"], "score": p["score"], "window": p["window"]}
        rows.append(
            {
                "gate": gate_label(p),
                "tau": p["tau"],
                "retain_fpr_upper95": p["calibration"]["retain_fpr_upper95"],
                **{name: float(fired(store, g).mean()) for name, store in stores.items()},
                "worst_attack_success": p["dilution"]["worst_attack_success"],
                "forget_cloze_p": p["forget"]["score"],
                "retain_cloze_p": p["retain"]["score"],
            }
        )
    record = {"command": "python benchmarks/gate_frontier.py --out " + args.out, "rows": rows}
    record["seconds"] = time.perf_counter() - start
    (out / "frontier.json").write_text(json.dumps(clean_json(record), indent=1) + "\n")
    (out / "sweep").mkdir(exist_ok=True)
    write_outputs(result, out / "sweep")
    print("\n".join(table(rows)))
    print(f"{record['seconds']:.0f} s")
    return 0


def table(rows) -> list[str]:
    """The frontier as a Markdown table ("none fired": a gate that fired on no undiluted prompt)."""

    def cell(x):
        return "none fired" if x is None else f"{x:.3f}"

    lines = [
        "| gate | τ | retain FPR bound | WMDP-bio | MMLU bio | MMLU non-bio | WikiText | worst dilution attack |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gate']} | refused: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['gate']} | {r['tau']:.3f} | {r['retain_fpr_upper95']:.3f} | {r['bio']:.3f} | {r['mmlu_bio']:.3f} | "
            f"{r['mmlu_nonbio']:.3f} | {r['wikitext']:.3f} | {cell(r['worst_attack_success'])} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
