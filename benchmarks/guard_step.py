"""The guard alone, per decoding step: one guardrail's forward on one new token (B rows), for the folder's own gate
and for the same guardrail with the paper's gate (fraction score, any feature) and with a window but no token
weights, so what the score and the weights cost is measured apart from the SAE encoder.

    python benchmarks/guard_step.py --model dsg-demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def variants(guardrail: dict) -> dict:
    """The folder's gate and the two simpler gates on the same features and SAE."""
    plain = {k: v for k, v in guardrail.items() if k not in ("token_weights", "token_threshold")}
    paper = {k: v for k, v in plain.items() if k != "window"} | {"score": "fraction"}
    out = {"fraction, any feature": paper, "window, any feature": {"window": 32, **plain, "score": "window"}}
    out["the folder's gate"] = guardrail
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dsg-demo", help="a DSG folder (its first guardrail is timed)")
    ap.add_argument("--batch", type=int, default=1, help="rows per step")
    ap.add_argument("--steps", type=int, default=2000, help="timed steps per gate")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    from modeling_dsg.runtime.guard_dsg import DSGGuard

    folder = Path(args.model)
    guardrail = json.loads((folder / "config.json").read_text())["guardrails"][0]
    weights = load_file(str(folder / "model.safetensors"))
    prefix = "guards.0.sae."
    sae_state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    hidden = torch.randn(args.batch, 1, guardrail["sae"]["d_in"], generator=torch.Generator().manual_seed(0))
    counted = torch.ones(args.batch, 1, dtype=torch.bool)
    print(f"guard alone, one decoding step, B={args.batch}, {torch.get_num_threads()} threads:")
    for name, g in variants(guardrail).items():
        guard = DSGGuard(g, 0).eval()
        guard.sae.load_state_dict(sae_state)
        state = guard.initial_state(args.batch, "cpu")
        with torch.no_grad():
            for _ in range(50):
                guard(hidden, counted, state)
            start = time.perf_counter()
            for _ in range(args.steps):
                state = guard(hidden, counted, state)[1]
            seconds = (time.perf_counter() - start) / args.steps
        print(f"  {name:<24} {seconds * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
