"""The guard alone, per decoding step: one guardrail's forward on one new token (B rows), for the folder's own gate
and for the same guardrail with the paper's gate (fraction score, any feature) and with a window but no token
weights, so what the score and the weights cost is measured apart from the SAE encoder.

    python benchmarks/guard_step.py --model dsg-demo

With --in-generation it times the guard's hook inside real greedy generations instead (the caches are cold there,
after the other blocks' matmuls): per decoding step, for the folder's gate, for the same hook with the guard's
tensor work taken out, and for that hook doing 40 trivial tensor operations, so the cost of an operation in a
generation can be read next to the guard's.

    python benchmarks/guard_step.py --model dsg-demo --in-generation

With --compare OTHER (a DSG folder, e.g. the same folder with another release's code files) it times both folders'
hooks inside the same generations, alternating, so two versions of the guard are compared under the same load.

    python benchmarks/guard_step.py --model dsg-demo --compare dsg-demo-previous

With --segments it splits one decoding step's wall time (a one-token call on the KV cache of a 32-token prompt, cut
back after it) into its parts, for the base and the DSG model alternated step by step: the DSG wrapper before and
after the base model's call, the embeddings, the blocks before and after the guarded one, the guard's hook and the
head; per part the medians and the median of the per-step differences, so what the guard costs and where shows apart
from the noise of whole calls. The whole step's DSG/base ratio comes with a 95% interval over the paired steps, so a
per-step cost goal can be shown with adjacent steps only (no drift between a round's two runs); --fired sets every
DSG threshold to 0 first, so that rows fire and the clamp edits (the benchmark's fired variant).

    taskset -c 1 python benchmarks/guard_step.py --model dsg-demo --segments --threads 1 --rounds 1000 [--fired]

With --segments --compare OTHER the other folder (e.g. the same folder with another version's code files) takes part
too, on the same weights, so the three are alternated step by step; it adds each part for OTHER and, per part and for
the whole step, the median of the per-step differences between the two folders with its 95% interval (whether one
version's step is faster than the other's, with nothing else changed).

    taskset -c 1 python benchmarks/guard_step.py --model dsg-demo-new --segments --compare dsg-demo --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def variants(guardrail: dict) -> dict:
    """The folder's gate and the two simpler gates on the same features and SAE; with token points, also the same
    learned gate scoring flags."""
    plain = {k: v for k, v in guardrail.items() if k not in ("token_weights", "token_threshold", "token_value")}
    paper = {k: v for k, v in plain.items() if k != "window"} | {"score": "fraction"}
    out = {"fraction, any feature": paper, "window, any feature": {"window": 32, **plain, "score": "window"}}
    if guardrail.get("token_value") == "points":
        out["learned gate, flags"] = {k: v for k, v in guardrail.items() if k != "token_value"}
    out["the folder's gate"] = guardrail
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dsg-demo", help="a DSG folder (its first guardrail is timed)")
    ap.add_argument("--batch", type=int, default=1, help="rows per step")
    ap.add_argument("--steps", type=int, default=2000, help="timed steps per gate")
    ap.add_argument("--in-generation", action="store_true", help="time the hook inside greedy generations")
    ap.add_argument(
        "--compare",
        help="another DSG folder: time both folders' hooks inside generations, alternating (with --segments: whole "
        "decoding steps, split into their parts)",
    )
    ap.add_argument("--segments", action="store_true", help="split a decoding step's time into its parts")
    ap.add_argument("--rounds", type=int, default=1000, help="--segments: alternating steps per model")
    ap.add_argument(
        "--fired",
        action="store_true",
        help="--segments: the DSG model(s) with every threshold at 0, so that a row fires on its first flagged token "
        "and the clamp edits (the benchmark's fired variant)",
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", help="--segments: also write the figures as JSON to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.segments:
        other = Path(args.compare) if args.compare else None
        return segments(Path(args.model), args.batch, args.rounds, args.out, other, args.fired)
    if args.compare:
        return compare(Path(args.model), Path(args.compare), args.batch)
    if args.in_generation:
        return in_generation(Path(args.model), args.batch)

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


def step_clock(model):
    """Time spent in the guarded block of `model` (its first guardrail's), hooks included, per forward:
    (the list the times are appended to, the hook handles)."""
    from modeling_dsg.runtime.modeling_dsg import decoder_layers

    block = decoder_layers(model.model)[model.guards[0].layer]
    steps, start = [], [0.0]
    handles = [
        block.register_forward_hook(lambda *_: start.__setitem__(0, time.perf_counter()), prepend=True),
        block.register_forward_hook(lambda *_: steps.append(time.perf_counter() - start[0])),
    ]
    return steps, handles


def median_step(model, steps: list, ids, new_tokens: int) -> float:
    """One greedy generation of `new_tokens` tokens from `ids`; the median of the decoding steps' times in `steps`
    (its first entry, the prompt, left out)."""
    steps.clear()
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return statistics.median(steps[1:])


def in_generation(folder: Path, batch: int, new_tokens: int = 32, rounds: int = 3, trivial_ops: int = 40):
    """Median time per decoding step spent in the guarded block's forward hooks, in greedy generations of
    `new_tokens` tokens from a 128-token prompt; the best of `rounds` generations per variant, variants alternated."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    guard = model.guards[0]
    cls, real_forward = type(guard), type(guard).forward
    steps, handles = step_clock(model)
    one = torch.zeros(1)

    def no_tensor_work(self, hidden, counted, state, want_flags=True):
        return None, state, state.best, None, None

    def trivial(self, hidden, counted, state, want_flags=True):
        x = one
        for _ in range(trivial_ops):
            x = x + 1
        return None, state, state.best, None, None

    variants = {
        "the folder's gate": real_forward,
        "hook, no tensor work": no_tensor_work,
        f"hook, {trivial_ops} trivial ops": trivial,
    }
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, 128), generator=torch.Generator().manual_seed(0))
    best = {name: float("inf") for name in variants}
    try:
        for _ in range(rounds):
            for name, forward in variants.items():
                cls.forward = forward
                best[name] = min(best[name], median_step(model, steps, ids, new_tokens))
    finally:
        cls.forward = real_forward
        for handle in handles:
            handle.remove()
    print(f"guard hook per decoding step inside generate, B={batch}, {torch.get_num_threads()} threads:")
    for name, seconds in best.items():
        print(f"  {name:<24} {seconds * 1e6:8.0f} us")


def compare(folder: Path, other: Path, batch: int, new_tokens: int = 32, rounds: int = 5):
    """Median time per decoding step in each folder's guarded block (hooks included), in greedy generations of
    `new_tokens` tokens from a 128-token prompt, the two folders alternated; the median and best of `rounds`."""
    from transformers import AutoModelForCausalLM

    timed = {}
    for path in (folder, other):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        timed[str(path)] = (model, step_clock(model)[0], [])
    vocab = next(iter(timed.values()))[0].config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, 128), generator=torch.Generator().manual_seed(0))
    for _ in range(rounds):
        for model, steps, medians in timed.values():
            medians.append(median_step(model, steps, ids, new_tokens))
    print(
        f"guard hook per decoding step inside generate, B={batch}, {torch.get_num_threads()} threads, {rounds} rounds:"
    )
    for name, (_, _, medians) in timed.items():
        print(f"  {name:<40} median {statistics.median(medians) * 1e6:6.0f} us, best {min(medians) * 1e6:6.0f} us")


def segments(
    folder: Path, batch: int, rounds: int, out: str | None = None, other: Path | None = None, fired: bool = False
) -> dict:
    """Where a decoding step's time goes, base and DSG model side by side (see the module docstring); with `other`, a
    second DSG folder as well; with `fired`, every DSG threshold at 0. The base (and the other folder's model) share
    the DSG model's weight tensors, so they differ by the guard and its wrapper alone (and by the two folders' code).
    The whole step's DSG/base ratio comes with its 95% interval: the steps are paired, each DSG step with the base
    step of the same round."""
    import gc
    import random

    from benchmark import load_pair, median_ci, share_weights  # (this folder's benchmark module)
    from transformers import AutoModelForCausalLM, DynamicCache

    from modeling_dsg.runtime.modeling_dsg import cache_argument, decoder_layers

    base, dsg, _ = load_pair(folder, torch.device("cpu"), torch.float32)
    models = {"base": base, "dsg": dsg}
    if other is not None:
        second = AutoModelForCausalLM.from_pretrained(other, trust_remote_code=True, dtype=torch.float32).eval()
        try:
            share_weights(second.model, dsg.model)
        except RuntimeError as error:
            raise SystemExit(f"--compare {other}: its base model is not the same as {folder}'s ({error})") from None
        if [g.guardrail_config() for g in second.guards] != [g.guardrail_config() for g in dsg.guards]:
            raise SystemExit(f"--compare {other}: its guardrails differ from {folder}'s; compare two code versions")
        models["other"] = second
    if fired:  # before the prompt's call, so that it decides as the variant does
        for model in models.values():
            for guard in getattr(model, "guards", ()):
                guard.threshold = 0.0
    layer = dsg.guards[0].layer
    stamps: list[float] = []

    def stamp(*_):
        stamps.append(time.perf_counter())

    # the same points in every model: the base model's call, its blocks, the guarded block
    for inner in (base, *(m.model for m in models.values() if m is not base)):
        inner.register_forward_pre_hook(stamp, prepend=True)
        blocks = decoder_layers(inner)
        for block in blocks:
            block.register_forward_pre_hook(stamp)
        blocks[layer].register_forward_hook(stamp, prepend=True)  # before the guard's hook
        blocks[-1].register_forward_hook(stamp)
        inner.register_forward_hook(stamp)
    # a step's intervals between the stamps, in order: the wrapper before, the embeddings, blocks 0..L, the guard's
    # hook, blocks L+1..n-1, the norm and head, the wrapper after
    n = len(decoder_layers(base))
    parts_of_a_step = {
        "DSG wrapper, before the base": [0],
        "embeddings and masks": [1],
        f"blocks 0-{layer}": list(range(2, layer + 3)),
        "the guard's hook": [layer + 3],
        f"blocks {layer + 1}-{n - 1}": list(range(layer + 4, n + 3)),
        "norm and head": [n + 3],
        "DSG wrapper, after the base": [n + 4],
    }
    gen = torch.Generator().manual_seed(0)
    vocab = dsg.config.text_config.vocab_size
    prompt = torch.randint(3, vocab, (batch, 32), generator=gen)
    step = torch.randint(3, vocab, (batch, 1), generator=gen)
    mask = torch.ones(batch, 33, dtype=torch.long)

    decisions = {}  # the DSG models' guardrail decisions after the prompt, which every step starts from

    def stepper(model):
        cache = DynamicCache(config=dsg.config.text_config)
        kw = {cache_argument(model): cache, "use_cache": True}
        decisions[model] = getattr(
            model(input_ids=prompt, attention_mask=mask[:, :-1], **kw), "guardrail_decisions", None
        )

        def run():
            stamps.clear()
            start = time.perf_counter()
            model(input_ids=step, attention_mask=mask, logits_to_keep=1, **kw)
            end = time.perf_counter()
            cache.crop(-1)
            times = [start, *stamps, end]
            if len(times) != n + 6:  # every stamp must have fired once, or the parts would be misnamed
                raise RuntimeError(f"a step made {len(stamps)} stamps, expected {n + 4}")
            return [b - a for a, b in zip(times, times[1:])]

        return run

    runs = {name: stepper(model) for name, model in models.items()}
    parts = {name: [] for name in runs}
    order = random.Random(0)
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            for _ in range(5):  # warm-up
                for run in runs.values():
                    run()
            for _ in range(rounds):
                for name in order.sample(list(runs), len(runs)):
                    parts[name].append(runs[name]())
    finally:
        gc.enable()

    def median(values):
        return statistics.median(values) * 1e6

    def shown(ci, digits: int) -> str:  # a 95% interval as printed
        return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "(too few rounds for an interval)"

    def versus(a, b):  # the median of the per-step differences a - b, and its 95% interval (us)
        differences = [(x - y) * 1e6 for x, y in zip(a, b)]
        return statistics.median(differences), median_ci(differences)

    rows, totals = [], {name: [sum(p) for p in parts[name]] for name in runs}
    ratios = [d / b for d, b in zip(totals["dsg"], totals["base"])]
    dsg_fired = torch.stack([d.fired for d in decisions[dsg].values()]).any(0)  # rows fired by any guardrail
    for part, index in parts_of_a_step.items():
        t = {name: [sum(p[i] for i in index) for p in parts[name]] for name in runs}
        row = {"part": part, "base_us": median(t["base"]), "dsg_us": median(t["dsg"])}
        row["difference_us"] = versus(t["dsg"], t["base"])[0]
        if other is not None:
            row["other_us"] = median(t["other"])
            row["dsg_minus_other_us"], row["dsg_minus_other_ci95"] = versus(t["dsg"], t["other"])
        rows.append(row)
    report = {
        "batch": batch,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "step_us": {name: median(totals[name]) for name in runs},
        "difference_us": versus(totals["dsg"], totals["base"])[0],
        "ratio": statistics.median(ratios),
        "ratio_ci95": median_ci(ratios),
        "fired": fired,
        "fired_rows": int(dsg_fired.sum()),
        "parts": rows,
    }
    if other is not None:
        report["other"] = str(other)
        report["dsg_minus_other_us"], report["dsg_minus_other_ci95"] = versus(totals["dsg"], totals["other"])
    print(f"one decoding step, B={batch}, {report['threads']} threads, {rounds} alternating steps each (medians, us):")
    extra = f" {'OTHER':>9} {'DSG - OTHER':>12}" if other is not None else ""
    print(f"  {'part':<30} {'base':>9} {'DSG':>9} {'DSG - base':>11}" + extra)
    for row in rows:
        line = f"  {row['part']:<30} {row['base_us']:9.1f} {row['dsg_us']:9.1f} {row['difference_us']:11.1f}"
        if other is not None:
            line += f" {row['other_us']:9.1f} {row['dsg_minus_other_us']:12.1f}"
        print(line)
    line = f"  {'whole step':<30} {report['step_us']['base']:9.1f} {report['step_us']['dsg']:9.1f} "
    line += f"{report['difference_us']:11.1f}"
    if other is not None:
        line += f" {report['step_us']['other']:9.1f} {report['dsg_minus_other_us']:12.1f}"
    print(line + f"   (DSG / base x{report['ratio']:.4f})")
    variant = f"fired (tau 0, {report['fired_rows']} of {batch} rows fired)" if fired else "at the folder's tau"
    interval = shown(report["ratio_ci95"], 4)
    print(f"  DSG / base per whole step, {variant}: x{report['ratio']:.4f}, 95% interval {interval}")
    if other is not None:
        interval = shown(report["dsg_minus_other_ci95"], 1)
        print(f"  DSG - OTHER per whole step: {report['dsg_minus_other_us']:.1f} us, 95% interval {interval}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
