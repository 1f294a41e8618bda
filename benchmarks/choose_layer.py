"""Choose the embedded default SAE's layer by measurement (SmolLM2-135M-Instruct, biology).

Step 1 (train): one quick SAE per candidate layer (TopK, or `--architecture`), all from ONE truncated forward pass
(`modeling_dsg.pipelines.train_sae.train_saes`, sae-lens' MultiSAETrainingRunner), on the first texts of
`embedded.sae_training_texts()` (build splits only).

Step 2 (measure), per candidate:
- explained variance, L0 and the CE-loss increase with the SAE reconstruction spliced in at the layer,
  on held-out WikiText (`train_sae.evaluate_sae`, full 30-layer forwards);
- dead fraction: features that never fire on any measurement token (the four sets below);
- guard quality: features selected with the paper's rule (`selection.select_dynamic`, N = 20,
  ratio percentile 95) from build-split forget/retain statistics; rho per prompt = fraction of
  counted tokens (BOS/EOS/pad excluded) where any selected feature fires; AUROC of rho for held-out
  WMDP-bio vs held-out non-biology MMLU prompts, and TPR/FPR at tau = P95(rho on retain rows).

Measurement sets (deterministic subsets by sha256): forget = 600 build-split forget texts; retain =
200 build WikiText paragraphs + 300 build non-bio MMLU prompts + 100 non-bio gloss documents; bio =
all held-out WMDP-bio prompts; nonbio = 500 held-out non-bio MMLU prompts. One row per
prompt/document (`rows.build_rows(packing=False)`: up to 256 tokens as the guard sees the prompt; the recorded
measurement predates that and put BOS first); BOS/EOS/pad are not
counted. One truncated forward pass serves all candidate layers (bf16 autocast with --bf16;
EV/L0/CE always in float32).

Run from the repository root:
    nice -n 10 python benchmarks/choose_layer.py --work /tmp/dsg/choose --layers 3 6 9 --bf16
Writes WORK/candidates.json and prints a markdown table. The final SAE is measured the same way:
    nice -n 10 python benchmarks/choose_layer.py --work /tmp/dsg/choose --stage measure \
        --sae modeling_dsg/embedded/sae/smollm2-135m-layer6          # writes WORK/final.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def stable_subset(texts, n, tag):
    from modeling_dsg.embedded.data import stable_unit

    if len(texts) <= n:
        return list(texts)
    return sorted(texts, key=lambda t: stable_unit(tag + t))[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/dsg/choose")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--architecture", default="topk", help="the candidates' SAE architecture (dsg train-sae's)")
    ap.add_argument("--tokens", type=int, default=150_000)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--n-texts", type=int, default=1500, help="first texts of sae_training_texts() to train on")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out WikiText tokens for EV/L0/CE")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training and the statistics forward")
    ap.add_argument("--stage", choices=["train", "measure", "all"], default="all")
    ap.add_argument(
        "--limit", type=int, default=None, help="at most this many texts per measurement set (smoke tests)"
    )
    ap.add_argument(
        "--sae", nargs="*", default=None, help="measure these sae-lens folders instead of WORK/saes/layerL"
    )
    args = ap.parse_args()

    import torch

    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.pipelines.train_sae import train_saes

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load_base_model(str(embedded.gguf_path()))
    print(f"model loaded in {time.time() - t0:.1f}s, torch threads {torch.get_num_threads()}", flush=True)

    sae_dir = work / "saes"
    if (
        args.stage in ("train", "all")
        and not args.sae
        and not all((sae_dir / f"layer{L}" / "cfg.json").exists() for L in args.layers)
    ):
        texts = embedded.sae_training_texts()[: args.n_texts]
        t = time.time()
        train_saes(
            model,
            tok,
            texts,
            args.layers,
            args.width,
            k=args.k,
            architecture=args.architecture,
            tokens=args.tokens,
            batch_tokens=args.batch_tokens,
            model_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            autocast=args.bf16,
            workdir=sae_dir,
        )
        train_s = time.time() - t
        (work / "train_time.json").write_text(json.dumps({"train_wall_s": train_s, "tokens": args.tokens}))
        print(f"trained {len(args.layers)} SAEs in {train_s:.0f}s", flush=True)
    if args.stage == "train":
        return
    from sae_lens import SAE

    if args.sae:
        from modeling_dsg.data.sources import sae_layer

        saes = {}
        for folder in args.sae:
            sae = SAE.load_from_disk(folder)
            saes[sae_layer(sae)] = sae
    else:
        saes = {L: SAE.load_from_disk(str(sae_dir / f"layer{L}")) for L in args.layers}
    table = measure(model, tok, saes, args)
    out = work / ("final.json" if args.sae else "candidates.json")
    out.write_text(json.dumps({"candidates": table, "args": vars(args)}, indent=2))
    print(f"wrote {out}")


def measure(model, tok, saes: dict, args) -> list[dict]:
    """Metrics for SAEs {layer: sae_lens SAE} of one model (see the module docstring)."""
    import torch

    from modeling_dsg.analysis.selection import FeatureStats, auroc, calibrate_threshold, select_dynamic, trigger_rate
    from modeling_dsg.data.rows import build_rows
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.pipelines.train_sae import evaluate_sae, hook_name, truncate_model

    layers = sorted(saes)
    width = {L: saes[L].cfg.d_sae for L in layers}
    held = embedded.heldout_prompts()
    sets = {
        "forget": stable_subset(embedded.forget_texts("build"), 600, "f"),
        "retain": (
            stable_subset(embedded.wiki_paragraphs("build"), 200, "w")
            + stable_subset(
                [embedded.mcq_prompt(r["question"], r["choices"]) for r in embedded.mmlu_records("build", "nonbio")],
                300,
                "m",
            )
            + stable_subset(embedded.gloss_docs("nonbio"), 100, "g")
        ),
        "bio": held["bio"],
        "nonbio": stable_subset(held["mmlu_nonbio"], 500, "n"),
    }
    if args.limit:
        sets = {k: v[: args.limit] for k, v in sets.items()}
    ignore = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    small = truncate_model(model, layers[-1])
    blocks = {L: small.get_submodule(hook_name(small, L)) for L in layers}
    # per set, per layer: feature sums, firing counts, token count, and per row the per-token active sets
    res = {
        name: {
            L: {
                "sum": torch.zeros(width[L], dtype=torch.float64),
                "cnt": torch.zeros(width[L], dtype=torch.long),
                "rows": [],
            }
            for L in layers
        }
        for name in sets
    }
    n_tok = {}
    t = time.time()
    for name, texts in sets.items():
        rows = build_rows(texts, tok, seq_len=256, min_chars=0, max_docs=None, packing=False)
        counted_all = rows.attention_mask.bool() & ~torch.isin(rows.input_ids, torch.tensor(sorted(ignore)))
        n_tok[name] = int(counted_all.sum())
        order = rows.attention_mask.sum(1).argsort()
        for L in layers:
            res[name][L]["rows"] = [None] * len(rows)
        with torch.no_grad():
            for s in range(0, len(rows), 16):
                idx = order[s : s + 16]
                width_ = int(rows.attention_mask[idx].sum(1).max())
                ids, mask = rows.input_ids[idx, :width_], rows.attention_mask[idx, :width_]
                captured = {}
                hs = [
                    blk.register_forward_hook(
                        lambda m, i, o, L=L, captured=captured: captured.__setitem__(
                            L, o[0] if isinstance(o, tuple) else o
                        )
                    )
                    for L, blk in blocks.items()
                ]
                try:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                        small.model(input_ids=ids, attention_mask=mask, use_cache=False)
                finally:
                    for h in hs:
                        h.remove()
                counted = counted_all[idx, :width_]
                for L in layers:
                    f = saes[L].encode(captured[L].float())
                    a = f[counted]
                    res[name][L]["sum"] += a.sum(0, dtype=torch.float64)
                    res[name][L]["cnt"] += (a > 0).sum(0)
                    for j, r in enumerate(idx.tolist()):
                        fr = f[j][counted[j]] > 0  # [n_counted, d_sae]
                        res[name][L]["rows"][r] = fr.to_sparse()
        print(
            f"  measured {name}: {len(rows)} rows, {n_tok[name]} counted tokens ({time.time() - t:.0f}s)", flush=True
        )

    def rho(rows_sparse, feats):
        sel = torch.zeros(rows_sparse[0].shape[1], dtype=torch.bool)
        sel[feats] = True
        out = []
        for sp in rows_sparse:
            n = sp.shape[0]
            if n == 0:
                out.append(0.0)
                continue
            idx = sp.indices()
            hit = sel[idx[1]]
            out.append(len(set(idx[0][hit].tolist())) / n)
        return torch.tensor(out, dtype=torch.float64)

    table = []
    for L in layers:
        fs = FeatureStats(
            res["forget"][L]["sum"] / n_tok["forget"],
            res["retain"][L]["sum"] / n_tok["retain"],
            res["forget"][L]["cnt"] / n_tok["forget"],
            res["retain"][L]["cnt"] / n_tok["retain"],
        )
        feats = select_dynamic(fs, n_features=20, ratio_percentile=95)
        r_ret, r_bio, r_non = (rho(res[n][L]["rows"], feats) for n in ("retain", "bio", "nonbio"))
        tau = calibrate_threshold(r_ret, 95)
        fpr_sorted = torch.sort(r_non, descending=True).values
        tau2 = float(fpr_sorted[max(0, int(0.02 * len(r_non)) - 1)])  # highest tau with FPR <= 2%
        fired_any = sum(res[n][L]["cnt"] for n in sets) > 0
        t = time.time()
        ev = evaluate_sae(
            saes[L], model, tok, embedded.heldout_prompts()["wikitext"], L, seq_len=128, max_tokens=args.eval_tokens
        )
        row = {
            "layer": L,
            "explained_variance": ev["explained_variance"],
            "l0": ev["l0"],
            "ce_loss": ev["ce_loss"],
            "ce_delta": ev["ce_delta"],
            "dead_fraction": 1 - fired_any.double().mean().item(),
            "auroc_bio_vs_nonbio": auroc(r_bio, r_non),
            "tau_p95_retain": tau,
            "tpr_at_tau": trigger_rate(r_bio, tau),
            "fpr_at_tau": trigger_rate(r_non, tau),
            "tpr_at_2pct_fpr": trigger_rate(r_bio, tau2),
            "features": feats,
            "eval_s": time.time() - t,
        }
        table.append(row)
        print(json.dumps(row), flush=True)
    print(f"counted tokens per set: {n_tok}")
    print("\n| layer | EV | L0 | CE base | CE +SAE (delta) | dead | AUROC | tau | TPR | FPR | TPR@2%FPR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['layer']} | {r['explained_variance']:.3f} | {r['l0']:.1f} | {r['ce_loss']:.3f} "
            f"| +{r['ce_delta']:.3f} | "
            f"{r['dead_fraction']:.3f} | {r['auroc_bio_vs_nonbio']:.3f} | {r['tau_p95_retain']:.3f} "
            f"| {r['tpr_at_tau']:.3f} | "
            f"{r['fpr_at_tau']:.3f} | {r['tpr_at_2pct_fpr']:.3f} |"
        )
    for r in table:
        r["counted_tokens"] = n_tok
    return table


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
