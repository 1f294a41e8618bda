"""Benchmark: the DSG guard next to its base model, side by side in one process, alternating runs.

Measures, for the base model and the DSG model with its rows unfired (tau = 1: the guard computes
everything but never edits) and fired (tau = 0: every row with a flagged token edits), and for the
reference way of applying the same guardrail (the paper's official code: a full SAE encode and decode
of every token at the guarded layer, the selected features clamped in fired rows, the SAE's error term
added back), unfired and fired, on a copy of the same base with the same SAE:
- forward latency at --lengths tokens and --batches rows;
- greedy generation throughput for --new-tokens tokens;
- decoding steps: --steps one-token calls on the KV cache of a 32-token prompt, cut back after each (--parts
  picks which of forward, generate and decode run);
- load time of the saved folders (base folder vs DSG folder) and their sizes (full and slim);
- peak memory (CUDA: max allocated per variant; CPU: the guard's extra bytes);
- build cost: the statistics pass's truncated forward (blocks 0..L) against a full forward, alternated
  like the rest, plus the statistics, selection and calibration times recorded in dsg_build.json.
Every variant runs once per round (or --repeats times, keeping its fastest), in a rotating order, so drift
and background load hit all of them alike; each run starts from a collected heap with Python's garbage collector
off (as in timeit; --keep-gc leaves it on); each DSG/base ratio is taken within a round, and the median,
its distribution-free 95% interval and the spread (p25-p75) of those ratios are reported, with a table
against the cost goals. Writes JSON with the machine description.

    python benchmarks/benchmark.py --model dsg-demo --out benchmark.json          # the embedded default
    python benchmarks/benchmark.py --tiny --out /tmp/bench.json                   # seconds, for the smoke test
    taskset -c 1 python benchmarks/benchmark.py --threads 1 --repeats 2 --rounds 40 ...   # a noisy machine, quieted
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, collect: bool = True):
    """Seconds for one `fn()`. Unless `collect` is False, Python's garbage collector runs before the call and is
    off during it, as in `timeit`, so that a collection which the allocations happen to trigger does not land in
    whichever variant crosses the threshold."""
    if collect:
        gc.collect()
    enabled = collect and gc.isenabled()
    if enabled:
        gc.disable()
    try:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def median_ci(values, confidence: float = 0.95):
    """A distribution-free confidence interval for the median: the order statistics x_(k), x_(n+1-k) with the
    largest k such that P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. None when n is too small for one."""
    values, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n  # P(fewer than k + 1 of n samples fall below the median)
        if tail > (1.0 - confidence) / 2:
            break
        k += 1
    return [values[k - 1], values[n - k]] if k else None


def quantiles(values):
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "p25": q[0],
        "p75": q[2],
        "min": values[0],
        "n": len(values),
        "median_ci95": median_ci(values),
    }


def alternate(variants: dict, rounds: int, device, warmup: int = 1, repeats: int = 1, collect: bool = True):
    """Time each variant once per round in a rotating order; per-round ratios to 'base'. With `repeats` > 1 the
    round's order runs that many times over and each variant's round time is its fastest, so that a run which the
    machine interrupted does not become a round's ratio."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        best = {name: math.inf for name in names}
        for _ in range(repeats):
            for name in order:
                best[name] = min(best[name], timed(variants[name], device, collect))
        for name in names:
            times[name].append(best[name])
    result = {name: {**quantiles(t), "seconds": t} for name, t in times.items()}
    if "reference_unfired" in times:  # the DSG guard against the reference implementation, round by round
        result["dsg_vs_reference"] = {
            kind: quantiles([a / b for a, b in zip(times[f"dsg_{kind}"], times[f"reference_{kind}"])])
            for kind in ("unfired", "fired")
        }
    for name in names:
        if name != "base":
            result[name]["ratio_to_base"] = quantiles([a / b for a, b in zip(times[name], times["base"])])
            result[name]["ratio_of_minima"] = result[name]["min"] / result["base"]["min"]
    return result


class GuardClock:
    """Time spent inside the guards' hooks during a forward, measured within the same call (so the
    machine's run-to-run noise cancels): a hook prepended to each guarded block notes the time, one
    appended after the guard's hook adds the elapsed time."""

    def __init__(self, dsg, device):
        from modeling_dsg.runtime.modeling_dsg import decoder_layers

        self.total, self.device, self.handles = 0.0, device, []
        for layer in sorted({g.layer for g in dsg.guards}):
            block = decoder_layers(dsg.model)[layer]
            self.handles.append(block.register_forward_hook(self._start, prepend=True))
            self.handles.append(block.register_forward_hook(self._stop))

    def _start(self, module, args, output):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        sync(self.device)
        self.total += time.perf_counter() - self._t0

    def close(self):
        for h in self.handles:
            h.remove()


class ReferenceGuard:
    """The reference implementation of the same guardrails on a copy of the base: at each guarded layer a
    full SAE encode of every token (all d_sae features), rho and the decision from the selected features,
    the selected features set to -c at flagged tokens of fired rows, a full decode, and the SAE's error
    term (x - decode(encode(x))) added back. Needs the full SAE (not a slim folder). `threshold` is
    shared by all its guardrails, like `with_tau` sets the DSG model's."""

    def __init__(self, base, dsg):
        from modeling_dsg.runtime.modeling_dsg import decoder_layers

        self.threshold, self.handles = 0.0, []
        layers = decoder_layers(base)
        for guard in dsg.guards:
            if guard.sae.slim:
                raise ValueError("the reference needs the full SAE; this folder is slim")
            self.handles.append(layers[guard.layer].register_forward_hook(self._hook(guard)))

    def _hook(self, guard):
        index, clamp = guard.feature_index, float(guard.clamp)

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            x = h.float()
            f = guard.sae.encode(x)  # [B, T, d_sae]
            error = x - guard.sae.decode(f)
            selected = f.index_select(-1, index)  # [B, T, N]
            flagged = (selected > 0).any(-1)  # [B, T]
            fired = flagged.float().mean(1) > self.threshold  # rho > tau, per row
            edit = (flagged & fired[:, None])[..., None]
            selected = torch.where(edit, torch.full_like(selected, -clamp), selected)
            out = (guard.sae.decode(f.index_copy(-1, index, selected)) + error).to(h.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook


def in_call_ratio(dsg, fn, device, rounds: int, collect: bool = True) -> dict:
    """DSG call time / (the same call minus the guards' hook time), per round; median and spread."""
    ratios, shares = [], []
    for _ in range(rounds + 1):
        clock = GuardClock(dsg, device)
        try:
            total = timed(fn, device, collect)
        finally:
            clock.close()
        ratios.append(total / (total - clock.total))
        shares.append(clock.total / total)
    return {"ratio": quantiles(ratios[1:]), "guard_share": quantiles(shares[1:])}


def quiet_share(dsg, fn) -> float | None:
    """The share of the decoding steps (calls of one token per row) in `fn()` in which no selected feature is active
    in any row: the calls a guard with score "features" and no negative weight settles with a count (see
    `DSGGuard.forward`). None when `fn` makes no decoding step."""
    with torch.no_grad(), dsg.record_guardrails() as records:
        fn()
    steps = [r.acts for r in records if r.acts.shape[1] == 1]
    return sum(not bool((acts > 0).any()) for acts in steps) / len(steps) if steps else None


GOALS = {256: 1.01, 1024: 1.005}  # the guard's cost goals, DSG / base: forward at these lengths
GENERATION_GOAL = 1.01  # and greedy generation


def goals(report: dict) -> list[dict]:
    """Each timed call that has a cost goal, per variant: the goal, the in-call ratio, the alternating median and
    its 95% confidence interval, and whether each meets the goal ("shown" when the interval's top does)."""
    calls = [(f"forward {k}", GOALS.get(int(k.split("xT")[1])), r) for k, r in report["forward"].items()]
    calls += [(f"generate {k}", GENERATION_GOAL, r) for k, r in report["generate"].items()]
    calls += [(f"decoding step {k}", GENERATION_GOAL, r) for k, r in report.get("decode_step", {}).items()]
    rows = []
    for call, goal, r in calls:
        if goal is None:
            continue
        for variant in ("dsg_unfired", "dsg_fired"):
            q, in_call = r[variant]["ratio_to_base"], r["in_call"][variant]["ratio"]["median"]
            ci = q.get("median_ci95")
            rows.append(
                {
                    "call": call,
                    "variant": variant,
                    "goal": goal,
                    "in_call": in_call,
                    "median": q["median"],
                    "median_ci95": ci,
                    "in_call_meets": in_call <= goal,
                    "median_meets": q["median"] <= goal,
                    "shown": ci is not None and ci[1] <= goal,
                }
            )
    return rows


def goal_table(report: dict) -> list[str]:
    """The cost goals as Markdown: one row per call and variant (see `goals`)."""
    rows = goals(report)
    if not rows:
        return []
    lines = [
        "",
        f"Against the cost goals ({report.get('rounds', '?')} rounds, fastest of {report.get('repeats', 1)} runs "
        "per variant per round; whole generations half the rounds). The 95% interval of the alternating median is "
        "distribution-free (order statistics); a goal is shown when the interval's top meets it.",
        "",
        "| call | variant | goal | in-call | alternating median | 95% interval | median meets | shown |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for g in rows:
        ci = g["median_ci95"]
        interval = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "too few rounds"
        lines.append(
            f"| {g['call']} | {g['variant'].removeprefix('dsg_')} | <= {g['goal']} | x{g['in_call']:.4f} | "
            f"x{g['median']:.4f} | {interval} | {'yes' if g['median_meets'] else 'no'} | "
            f"{'yes' if g['shown'] else 'no'} |"
        )
    return lines


def markdown(report: dict) -> str:
    """The report as Markdown tables (medians; ratios with their p25-p75 spread)."""

    def ratio(r):
        q = r["ratio_to_base"]
        return f"x{q['median']:.3f} [{q['p25']:.3f}, {q['p75']:.3f}]"

    def against(q):  # DSG / reference: the median and its 95% interval when there are rounds enough for one
        ci = q.get("median_ci95")
        return f"x{q['median']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    m = report["machine"]
    lines = [
        f"Machine: {m['name']} ({m['device']}, {m['threads']} threads"
        + (f" on {m['cpus_allowed']} of {m['cpus']} cores" if m.get("cpus_allowed") else "")
        + f"), torch {m['torch']}, {m['dtype']}.",
        "",
        "Ratios: median of per-round DSG/base time ratios [p25, p75] over alternating runs, the ratio of the "
        "fastest runs (min), and the in-call ratio: one DSG call's time over the same call minus the time spent "
        "in the guard's hook (immune to run-to-run noise; it leaves out the DSG wrapper's own few Python lines).",
    ]

    def cells(r):
        out = []
        for v in ("dsg_unfired", "dsg_fired"):
            ic = r.get("in_call", {}).get(v)
            out += [ratio(r[v]), f"x{r[v]['ratio_of_minima']:.3f}", f"x{ic['ratio']['median']:.4f}" if ic else "n/a"]
        return " | ".join(out)

    if report["forward"]:
        lines += [
            "",
            "| forward | base (ms) | unfired / base | (min) | in-call | fired / base | (min) | in-call |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for key, r in report["forward"].items():
        lines.append(f"| {key} | {r['base']['median'] * 1000:.1f} | {cells(r)} |")
    if report["generate"]:
        lines += [
            "",
            "| greedy generation | base (tokens/s) | unfired / base | (min) | in-call | fired / base | (min) "
            "| in-call |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for key, r in report["generate"].items():
        lines.append(f"| {key}, {report['new_tokens']} new tokens | {r['base']['tokens_per_s']:.1f} | {cells(r)} |")
    if report.get("decode_step"):
        lines += [
            "",
            f"| decoding step ({report.get('steps', '?')} per run, 32-token cache) | base (ms per step) | unfired / "
            "base | (min) | in-call | fired / base | (min) | in-call |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, r in report["decode_step"].items():
            lines.append(f"| {key} | {r['base']['step_ms']:.2f} | {cells(r)} |")
    if report.get("reference"):
        lines += [
            "",
            f"Reference implementation ({report['reference']}), same model, SAE and runs; DSG / reference is the "
            "median of per-round ratios (with its 95% interval when there are rounds enough):",
            "",
            "| call | reference unfired / base | DSG unfired / reference unfired | reference fired / base "
            "| DSG fired / reference fired |",
            "|---|---:|---:|---:|---:|",
        ]
        calls = [(f"forward {k}", r) for k, r in report["forward"].items()]
        calls += [(f"generate {k}", r) for k, r in report["generate"].items()]
        calls += [(f"decoding step {k}", r) for k, r in report.get("decode_step", {}).items()]
        for key, r in calls:
            if "reference_unfired" not in r:
                continue
            row = [ratio(r["reference_unfired"]), against(r["dsg_vs_reference"]["unfired"])]
            row += [ratio(r["reference_fired"]), against(r["dsg_vs_reference"]["fired"])]
            lines.append(f"| {key} | " + " | ".join(row) + " |")
    quiet = [
        f"{part} {key} {r['quiet_steps']:.0%}"
        for part, table in (("generate", report["generate"]), ("decoding step", report.get("decode_step", {})))
        for key, r in table.items()
        if r.get("quiet_steps") is not None
    ]
    if quiet:
        lines += [
            "",
            "Decoding steps in which no selected feature is active in any row (a count settles them): "
            + ", ".join(quiet)
            + ".",
        ]
    lines += goal_table(report)
    st, ld = report["storage"], report["load"]
    lines += [
        "",
        "| storage and load | value |",
        "|---|---:|",
        f"| base folder | {st['base_bytes'] / 1e6:.1f} MB |",
        f"| DSG folder | {st['dsg_full_bytes'] / 1e6:.1f} MB |",
        f"| DSG folder, slim | {st['dsg_slim_bytes'] / 1e6:.1f} MB |",
        f"| load time, base folder | {ld['base']['median']:.3f} s |",
        f"| load time DSG / base | {ratio(ld['dsg'])} |",
        f"| load time slim / base | {ratio(ld['dsg_slim'])} |",
    ]
    if "build_cost" in report:
        b = report["build_cost"]
        lines.append(
            f"| truncated forward (blocks 0..{b['layer']} of {b['n_layers']}) speed-up over a full forward | "
            f"x{b['truncated_speedup']:.2f} |"
        )
    if "torch_compile" in report:
        lines.append(
            f"| torch.compile of the base with the guard installed | "
            f"{'works' if report['torch_compile']['works'] else 'fails'} |"
        )
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_pair(model_dir, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dsg = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    # the base shares the DSG model's weight tensors: the two differ only by the guard, not by where the weights lie
    base = share_weights(AutoModelForCausalLM.from_config(dsg.config.text_config, dtype=dtype), dsg.model)
    return base.eval(), dsg, tok


def share_weights(model, source):
    """Point `model`'s weights at `source`'s tensors (same architecture), tied ones tied again; returns `model`."""
    model.load_state_dict(source.state_dict(), assign=True)
    model.tie_weights()
    return model


def tiny_folder(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tiny

    return tiny.save_tiny_dsg(root / "tiny-dsg", guardrails=[tiny.guardrail("jumprelu", layer=1)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dsg-demo", help="a DSG model folder (default: the demo's)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model (smoke test)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["forward", "generate", "decode"],
        choices=["forward", "generate", "decode"],
        help="what to time: forwards, whole greedy generations, decoding steps (default: all three)",
    )
    ap.add_argument("--steps", type=int, default=10, help="decoding steps per timed run (default 10)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each variant per round; the round keeps each variant's fastest (default 1)",
    )
    ap.add_argument(
        "--no-reference", action="store_true", help="do not time the reference implementation (halves the run)"
    )
    ap.add_argument(
        "--keep-gc",
        action="store_true",
        help="leave Python's garbage collector on during timed runs (default: off, as in timeit)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    ap.add_argument(
        "--compile", action="store_true", help="also check torch.compile on the base with the guard installed"
    )
    ap.add_argument("--out", default="benchmark.json")
    ap.add_argument("--markdown", help="also write the tables as Markdown to this file")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dsg-bench-"))
    try:
        model_dir = tiny_folder(work) if args.tiny else Path(args.model)
        if not (model_dir / "config.json").is_file():
            sys.exit(f"error: {model_dir} is not a model folder (run `dsg demo` first, or pass --model / --tiny)")
        base, dsg, tok = load_pair(model_dir, device, dtype)
        vocab = dsg.config.text_config.vocab_size
        report = {
            "machine": {
                "device": str(device),
                "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                "threads": torch.get_num_threads(),
                "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "dtype": args.dtype,
            },
            "model": str(model_dir),
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "steps": args.steps,
            "repeats": args.repeats,
            "gc_during_runs": args.keep_gc,
            "guardrails": [g["name"] for g in dsg.config.guardrails],
            "forward": {},
            "generate": {},
            "decode_step": {},
        }
        gen = torch.Generator().manual_seed(0)
        collect = not args.keep_gc  # every timed run from a collected heap, the collector off (see `timed`)

        def in_call(fn, rounds: int) -> dict:
            return in_call_ratio(dsg, fn, device, rounds, collect)

        def with_tau(tau, fn):
            def run():
                for g in dsg.guards:
                    g.threshold = tau
                fn()

            return run

        # the reference implementation of the same guardrails, on a copy of the base (None for a slim folder)
        reference = reference_model = None
        if not args.no_reference:
            reference_model = copy.deepcopy(base)
            try:
                reference = ReferenceGuard(reference_model, dsg)
            except ValueError as err:
                print(f"reference: skipped ({err})")
                reference = reference_model = None
        report["reference"] = (
            "full SAE encode and decode of every token at the guarded layer, error term added back"
            if reference is not None
            else None
        )

        def ref_tau(tau, fn):
            def run():
                reference.threshold = tau
                fn()

            return run

        def timed_variants(make):
            """What `alternate` times: `make(model)` for the base, DSG unfired and fired (tau 1 and 0), and the
            reference implementation the same two ways when there is one."""
            variants = {
                "base": make(base),
                "dsg_unfired": dsg_at(1.0, make),
                "dsg_fired": dsg_at(0.0, make),
            }
            if reference is not None:
                variants.update(
                    reference_unfired=ref_tau(1.0, make(reference_model)),
                    reference_fired=ref_tau(0.0, make(reference_model)),
                )
            return variants

        def dsg_at(tau, make):
            """`make(dsg)` with tau set first (a prefill that `make` runs decides as the variant does), then run
            at tau."""
            for g in dsg.guards:
                g.threshold = tau
            return with_tau(tau, make(dsg))

        # -- forward latency ----------------------------------------------------------------------
        for batch in args.batches if "forward" in args.parts else ():
            for length in args.lengths:
                ids = torch.randint(3, vocab, (batch, length), generator=gen).to(device)
                mask = torch.ones_like(ids)

                @torch.no_grad()
                def fwd(model, ids=ids, mask=mask):
                    return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False)

                with torch.no_grad(), dsg.record_guardrails() as rec:
                    for g in dsg.guards:
                        g.threshold = 0.0
                    dsg(input_ids=ids, attention_mask=mask, use_cache=False)
                fired = float(torch.stack([r["fired"].float().mean() for r in rec]).mean())
                variants = timed_variants(fwd)
                res = alternate(variants, args.rounds, device, repeats=args.repeats, collect=collect)
                res["fired_fraction_at_tau0"] = fired
                if reference is not None:  # the reference applies the same guardrail: same logits, fired or not
                    res["reference_max_abs_logit_diff"] = {}
                    for kind, tau in (("unfired", 1.0), ("fired", 0.0)):
                        reference.threshold = tau
                        for g in dsg.guards:
                            g.threshold = tau
                        with torch.no_grad():
                            a = dsg(input_ids=ids, attention_mask=mask, use_cache=False).logits
                            b = reference_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                        res["reference_max_abs_logit_diff"][kind] = float((a - b).abs().max())
                res["in_call"] = {
                    "dsg_unfired": in_call(with_tau(1.0, fwd(dsg)), 3),
                    "dsg_fired": in_call(with_tau(0.0, fwd(dsg)), 3),
                }
                report["forward"][f"B{batch}xT{length}"] = res
                print(
                    f"forward B={batch} T={length}: base {res['base']['median'] * 1000:.1f} ms, "
                    f"unfired x{res['dsg_unfired']['ratio_to_base']['median']:.4f}, "
                    f"fired x{res['dsg_fired']['ratio_to_base']['median']:.4f}"
                    + (
                        f"; reference unfired x{res['reference_unfired']['ratio_to_base']['median']:.4f}"
                        if "reference_unfired" in res
                        else ""
                    )
                )

        # -- generation throughput ----------------------------------------------------------------
        for batch in args.batches if "generate" in args.parts else ():
            prompt = torch.randint(3, vocab, (batch, 32), generator=gen).to(device)

            def gen_fn(model, prompt=prompt):
                kw = dict(
                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
                )
                return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)

            variants = timed_variants(gen_fn)
            res = alternate(variants, max(3, args.rounds // 2), device, repeats=args.repeats, collect=collect)
            for name in variants:
                res[name]["tokens_per_s"] = batch * args.new_tokens / res[name]["median"]
            res["in_call"] = {
                "dsg_unfired": in_call(with_tau(1.0, gen_fn(dsg)), 2),
                "dsg_fired": in_call(with_tau(0.0, gen_fn(dsg)), 2),
            }
            res["quiet_steps"] = quiet_share(dsg, gen_fn(dsg))
            report["generate"][f"B{batch}"] = res
            print(
                f"generate B={batch} {args.new_tokens} tokens: base {res['base']['tokens_per_s']:.1f} tok/s, "
                f"unfired x{res['dsg_unfired']['ratio_to_base']['median']:.4f}, "
                f"fired x{res['dsg_fired']['ratio_to_base']['median']:.4f}"
            )
        # -- decoding steps -----------------------------------------------------------------------
        # generation's steady state without its prefill or generate's own loop: --steps one-token calls on the
        # KV cache of a 32-token prompt, each cut back after it (crop), so that every step sees the same cache
        for batch in args.batches if "decode" in args.parts else ():
            prompt = torch.randint(3, vocab, (batch, 32), generator=gen).to(device)
            step_ids = torch.randint(3, vocab, (batch, 1), generator=gen).to(device)
            mask = torch.ones(batch, 33, dtype=torch.long, device=device)

            def steps_fn(model, prompt=prompt, step_ids=step_ids, mask=mask):
                from transformers import DynamicCache

                from modeling_dsg.runtime.modeling_dsg import cache_argument

                cache = DynamicCache(config=dsg.config.text_config)
                kw = {cache_argument(model): cache, "use_cache": True}
                with torch.no_grad():
                    model(input_ids=prompt, attention_mask=mask[:, :-1], **kw)

                @torch.no_grad()
                def run():
                    for _ in range(args.steps):
                        model(input_ids=step_ids, attention_mask=mask, logits_to_keep=1, **kw)
                        cache.crop(-1)

                return run

            variants = timed_variants(steps_fn)
            res = alternate(variants, args.rounds, device, repeats=args.repeats, collect=collect)
            for name in variants:
                res[name]["step_ms"] = res[name]["median"] / args.steps * 1000
            res["in_call"] = {
                "dsg_unfired": in_call(dsg_at(1.0, steps_fn), 3),
                "dsg_fired": in_call(dsg_at(0.0, steps_fn), 3),
            }
            res["quiet_steps"] = quiet_share(dsg, steps_fn(dsg))
            report["decode_step"][f"B{batch}"] = res
            print(
                f"decoding step B={batch}: base {res['base']['step_ms']:.2f} ms, "
                f"unfired x{res['dsg_unfired']['ratio_to_base']['median']:.4f}, "
                f"fired x{res['dsg_fired']['ratio_to_base']['median']:.4f}"
            )
        for g, spec in zip(dsg.guards, dsg.config.guardrails):
            g.threshold = spec["threshold"]

        # -- storage and load time ----------------------------------------------------------------
        base_dir, slim_dir = work / "base", work / "slim"
        base.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
        dsg.save_pretrained(slim_dir, slim=True)

        def size(d):
            return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))

        from transformers import AutoModelForCausalLM

        loads = alternate(
            {
                "base": lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype),
                "dsg": lambda: AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype),
                "dsg_slim": lambda: AutoModelForCausalLM.from_pretrained(
                    slim_dir, trust_remote_code=True, dtype=dtype
                ),
            },
            max(3, args.rounds // 2),
            torch.device("cpu"),
            collect=collect,
        )
        report["load"] = loads
        guard_bytes = sum(t.numel() * t.element_size() for g in dsg.guards for t in [*g.parameters(), *g.buffers()])
        report["storage"] = {
            "base_bytes": size(base_dir),
            "dsg_full_bytes": size(model_dir),
            "dsg_slim_bytes": size(slim_dir),
            "guard_bytes_in_memory": guard_bytes,
        }
        print(
            f"load: DSG/base x{loads['dsg']['ratio_to_base']['median']:.3f}, "
            f"slim/base x{loads['dsg_slim']['ratio_to_base']['median']:.3f}; "
            f"sizes base {size(base_dir) / 1e6:.1f} MB, DSG {size(model_dir) / 1e6:.1f} MB, "
            f"slim {size(slim_dir) / 1e6:.1f} MB"
        )

        # -- memory ---------------------------------------------------------------------------------
        if device.type == "cuda":
            peaks = {}
            ids = torch.randint(3, vocab, (max(args.batches), max(args.lengths)), generator=gen).to(device)
            for name, model, tau in (("base", base, None), ("dsg_unfired", dsg, 1.0), ("dsg_fired", dsg, 0.0)):
                if tau is not None:
                    for g in dsg.guards:
                        g.threshold = tau
                torch.cuda.reset_peak_memory_stats(device)
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
                peaks[name] = torch.cuda.max_memory_allocated(device)
            report["peak_memory_bytes"] = peaks
        else:
            report["peak_memory_bytes"] = {
                "note": "CPU: the guard adds its tensors (guard_bytes_in_memory) and one "
                "hidden-state-sized delta per guarded layer while it runs"
            }

        # -- build cost ---------------------------------------------------------------------------------
        from modeling_dsg.analysis.stats import LayerOutput

        layer = min(g.layer for g in dsg.guards)
        ids = torch.randint(3, vocab, (max(args.batches), min(args.lengths)), generator=gen).to(device)
        mask = torch.ones_like(ids)
        truncated = LayerOutput(base, layer)
        with torch.no_grad():
            cost = alternate(
                {
                    "base": lambda: base(input_ids=ids, attention_mask=mask, use_cache=False),
                    "truncated": lambda: truncated(ids, mask),
                },
                max(3, args.rounds // 2),
                device,
                collect=collect,
            )
        record_file = model_dir / "dsg_build.json"
        recorded = json.loads(record_file.read_text())["guardrails"][0]["timings"] if record_file.is_file() else {}
        report["build_cost"] = {
            "layer": layer,
            "n_layers": dsg.config.text_config.num_hidden_layers,
            "rows": list(ids.shape),
            "full_forward_s": cost["base"]["median"],
            "truncated_forward_s": cost["truncated"]["median"],
            "truncated_speedup": 1.0 / cost["truncated"]["ratio_to_base"]["median"],
            "recorded_build": {
                k: recorded.get(k)
                for k in (
                    "rows_s",
                    "statistics_s",
                    "statistics_tokens",
                    "statistics_tokens_per_s",
                    "selection_s",
                    "calibration_s",
                )
            },
        }
        print(
            f"build cost: truncated forward (blocks 0..{layer}) "
            f"x{report['build_cost']['truncated_speedup']:.2f} faster than a full forward; "
            f"recorded: {report['build_cost']['recorded_build']}"
        )

        if args.compile:
            try:
                compiled = torch.compile(dsg.model)
                ids = torch.randint(3, vocab, (1, 64), generator=gen).to(device)
                with torch.no_grad():
                    out = compiled(input_ids=ids).logits
                    ref = dsg.model(input_ids=ids).logits
                report["torch_compile"] = {"works": True, "max_abs_diff": float((out - ref).abs().max())}
            except Exception as err:  # report, do not hide
                report["torch_compile"] = {"works": False, "error": f"{type(err).__name__}: {err}"[:500]}
            print(f"torch.compile with the guard installed: {report['torch_compile']}")

        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        if args.markdown:
            Path(args.markdown).write_text(markdown(report))
            print(f"wrote {args.markdown}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
