"""RMU on the embedded default (SmolLM2-135M-Instruct; forget/retain = the build splits), with the held-out
per-token NLL of the base and the RMU model before and after.

    nice -n 10 python benchmarks/rmu_embedded.py [--n-eval N] [--json PATH]

What it measured is recorded in benchmarks/README.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from modeling_dsg.pipelines.rmu import RMUOptions, rmu_unlearn


def model_nll_per_token(model, tokenizer, texts, *, batch_size: int = 8, max_len: int = 512) -> float:
    """Mean per-token NLL (nats) of `texts` under `model`: every real token after the first, pooled."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_len
                ).to(device)
                logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1].float()
                target, mask = enc.input_ids[:, 1:], enc.attention_mask[:, 1:].bool()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                total += float(nll[mask].sum())
                count += int(mask.sum())
    finally:
        tokenizer.padding_side = side
    return total / max(count, 1)


def measure_embedded(options: RMUOptions | None = None, n_eval: int = 32) -> dict:
    """RMU on the embedded default (SmolLM2-135M-Instruct; forget/retain = the build splits), then the
    per-token NLL of base and RMU model on the first `n_eval` prompts of each held-out set."""
    import copy

    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded

    start = time.perf_counter()
    model, tokenizer = load_base_model(str(embedded.gguf_path()))
    load_s = time.perf_counter() - start
    base = copy.deepcopy(model)
    info = rmu_unlearn(model, tokenizer, embedded.forget_texts("build"), embedded.retain_texts("build"), options)
    start = time.perf_counter()
    nll = {}
    for name, texts in embedded.heldout_prompts().items():
        before = model_nll_per_token(base, tokenizer, texts[:n_eval])
        after = model_nll_per_token(model, tokenizer, texts[:n_eval])
        nll[name] = {"base": before, "rmu": after, "delta": after - before}
    return {"info": info, "load_s": load_s, "eval_s": time.perf_counter() - start, "n_eval": n_eval, "nll": nll}


def main(argv=None) -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description="RMU on the embedded default, with held-out NLL before and after")
    parser.add_argument("--n-eval", type=int, default=32, help="prompts per held-out set (default 32)")
    parser.add_argument("--json", help="write the full record here")
    args = parser.parse_args(argv)
    result = measure_embedded(n_eval=args.n_eval)
    info = result["info"]
    f, n = info["losses"]["forget"], info["losses"]["forget_norm"]
    print(f"torch threads {torch.get_num_threads()}; model load {result['load_s']:.1f} s")
    print(f"RMU: layer {info['layer']}, weights {', '.join(info['updated_parameters'])}")
    print(
        f"c = {info['steering_coeff']:.1f} ({info['options']['multiplier']} x mean forget norm "
        f"{info['forget_activation_norm']:.1f}), alpha {info['alpha']:g}, lr {info['options']['lr']:g}"
    )
    print(
        f"{info['steps']} steps, {info['tokens']['total']} tokens ({info['tokens']['forget']} forget + "
        f"{info['tokens']['retain']} retain): training {info['train_s']:.1f} s, {info['tokens_per_s']:.0f} tokens/s, "
        f"rmu_unlearn wall {info['wall_s']:.1f} s"
    )
    print(
        f"forget term {f[0]:.1f} -> {sum(f[-5:]) / 5:.1f} (mean of the last 5); forget norm {n[0]:.1f} -> "
        f"{sum(n[-5:]) / 5:.1f}; retain term max {max(info['losses']['retain']):.4g}, "
        f"last {info['losses']['retain'][-1]:.4g}"
    )
    print(f"held-out per-token NLL, first {result['n_eval']} prompts of each set ({result['eval_s']:.0f} s):")
    for name, v in result["nll"].items():
        print(f"  {name:12s} base {v['base']:.3f}  rmu {v['rmu']:.3f}  delta {v['delta']:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
