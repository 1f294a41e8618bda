"""SAE quality side by side: explained variance, L0, dead features and the CE-loss increase of each SAE, on the same
held-out tokens (`train_sae.evaluate_sae`, the metrics `dsg train-sae` records), with more tokens than training's
8,192 so that "dead" means "never fires" rather than "did not fire in a small sample". Dead features are also
counted at every prefix size, so the table shows how the count falls as tokens grow.

    python benchmarks/sae_quality.py --sae modeling_dsg/embedded/sae/smollm2-135m-layer6 \
        experiments/guard-v2/smollm2-135m-layer6-batchtopk --out experiments/guard-v2/quality

Held-out text: the embedded default's held-out WikiText paragraphs and held-out MMLU questions (every subject), never
used to train either SAE or to build a guardrail.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_formats import write_record  # noqa: E402


def heldout_texts() -> list[str]:
    from modeling_dsg.data.sources import mcq_prompt
    from modeling_dsg.embedded import data

    texts = list(data.heldout_prompts()["wikitext"])
    for side in ("bio", "nonbio"):
        texts += [mcq_prompt(r["question"], r["choices"]) for r in data.mmlu_records("heldout", side)]
    return texts


def dead_by_tokens(sae, model, tokenizer, texts, layer: int, seq_len: int, max_tokens: int) -> dict:
    """Features that never fired after each power-of-two token count (position 0 of each row skipped); the forward
    stops after block `layer`."""
    from modeling_dsg.analysis.forward import block_output
    from modeling_dsg.pipelines.train_sae import pack_rows

    ids = torch.tensor(pack_rows(texts, tokenizer, seq_len)[: max(1, max_tokens // seq_len)])
    fired, seen, marks, out = None, 0, 8192, {}
    with torch.no_grad():
        for batch in ids.split(8):
            h = block_output(model, layer, lambda batch=batch: model(batch))
            for row in sae.encode(h[:, 1:].float()) > 0:
                fired = row.any(0) if fired is None else fired | row.any(0)
                seen += row.shape[0]
                if seen >= marks:
                    out[str(marks)] = int((~fired).sum())
                    marks *= 2
    out[str(seen)] = int((~fired).sum())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", nargs="+", required=True, help="sae-lens folders")
    ap.add_argument("--base", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--tokens", type=int, default=100_000, help="held-out tokens (default 100,000)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", required=True, help="folder for sae_quality.json and README.md")
    args = ap.parse_args(argv)

    from modeling_dsg.data.sources import load_base_model, load_sae, sae_layer
    from modeling_dsg.embedded.data import gguf_path
    from modeling_dsg.pipelines.train_sae import evaluate_sae

    torch.manual_seed(0)
    model, tokenizer = load_base_model(args.base or str(gguf_path()))
    model.eval()
    texts = heldout_texts()
    rows = {}
    for folder in args.sae:
        start = time.perf_counter()
        sae = load_sae(folder)
        layer = sae_layer(sae)
        metrics = evaluate_sae(sae, model, tokenizer, texts, layer, seq_len=args.seq_len, max_tokens=args.tokens)
        metrics["dead_features"] = round(metrics["dead_fraction"] * sae.cfg.d_sae)
        metrics["dead_by_tokens"] = dead_by_tokens(sae, model, tokenizer, texts, layer, args.seq_len, args.tokens)
        metrics.update(
            architecture=sae.cfg.architecture(), d_sae=sae.cfg.d_sae, layer=layer, seconds=time.perf_counter() - start
        )
        rows[folder] = metrics
    record = {"command": "python benchmarks/sae_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    record["saes"] = rows
    write_record(args.out, "sae_quality.json", record, markdown(record))


def markdown(record: dict) -> str:
    lines = [
        "# SAE quality on the same held-out tokens",
        "",
        f"`{record['command']}`",
        "",
        "| SAE | architecture | tokens | explained variance | CE-loss increase | L0 | dead features |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for folder, m in record["saes"].items():
        lines.append(
            f"| `{folder}` | {m['architecture']} | {m['eval_tokens']:,} | {m['explained_variance']:.3f} | "
            f"+{m['ce_delta']:.3f} | {m['l0']:.1f} | {m['dead_features']} ({m['dead_fraction']:.1%}) |"
        )
    lines += ["", "Dead features (never fired) after the first T held-out tokens:", ""]
    marks = sorted({int(t) for m in record["saes"].values() for t in m["dead_by_tokens"]})
    lines += ["| SAE | " + " | ".join(f"{t:,}" for t in marks) + " |", "|---|" + "---:|" * len(marks)]
    for folder, m in record["saes"].items():
        cells = [str(m["dead_by_tokens"].get(str(t), "")) for t in marks]
        lines.append(f"| `{Path(folder).name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
