"""`dsg build` on the embedded default in one process against N processes (torchrun, CPU, gloo): wall time,
and a check that both wrote the same build.

Writes the embedded forget/retain build splits to JSON-lines files in --work, then runs, each --repeat times,

    OMP_NUM_THREADS=<cores>       python -m modeling_dsg build ARGS --out WORK/one-<i>-<cores>
    OMP_NUM_THREADS=<cores / N>   torchrun --standalone --nproc_per_node N -m modeling_dsg build ARGS --out WORK/n-<i>

alternating them (`--one-threads 2 1`: the one process with 2 threads, then with 1), and prints a
markdown table (wall time of the whole command, the statistics pass as dsg_build.json records it) and
whether the folders agree (features, tau, features.json, every file but dsg_build.json). ARGS are the
demo's options with a smaller pass by default (--max-docs 256).

    python benchmarks/distributed_build.py --work /tmp/dsg-dist --processes 2 --cores 2 --max-docs 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def run(command, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return wall


def same_build(a: Path, b: Path) -> dict:
    ga = json.loads((a / "config.json").read_text())["guardrails"]
    gb = json.loads((b / "config.json").read_text())["guardrails"]
    ra = json.loads((a / "dsg_build.json").read_text())["guardrails"][-1]
    rb = json.loads((b / "dsg_build.json").read_text())["guardrails"][-1]
    files = sorted(p.name for p in a.iterdir() if p.name != "dsg_build.json")
    return {
        "features": ga[-1]["features"] == gb[-1]["features"],
        "tau_a": ra["tau"],
        "tau_b": rb["tau"],
        "guardrail": ga == gb,
        "heldout": ra["heldout"] == rb["heldout"],
        "files_identical": [n for n in files if (a / n).read_bytes() == (b / n).read_bytes()] == files,
        "record_but_timings": {k: v for k, v in ra.items() if k != "timings"}
        == {k: v for k, v in rb.items() if k != "timings"},
    }


def main(argv=None):
    from modeling_dsg.embedded import data as embedded
    from modeling_dsg.embedded.demo import default_sae

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="a folder for the inputs and the built folders")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="threads of the one process")
    ap.add_argument(
        "--one-threads", type=int, nargs="+", help="the one process's OMP_NUM_THREADS, one run each (default --cores)"
    )
    ap.add_argument("--max-docs", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    forget = write_jsonl(work / "forget.jsonl", embedded.forget_texts("build"))
    retain = write_jsonl(work / "retain.jsonl", embedded.retain_texts("build"))
    build = [
        "build", "--base", str(embedded.gguf_path()), "--sae", str(default_sae()),
        "--forget", str(forget), "--retain", str(retain), "--name", "biology",
        "--seq-len", "256", "--no-packing", "--max-docs", str(args.max_docs), "--batch-size", "16",
    ]  # fmt: skip
    one_cmd = [sys.executable, "-m", "modeling_dsg", *build]
    n = args.processes
    n_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    n_cmd += ["-m", "modeling_dsg", *build]
    rows = []
    for i in range(args.repeat):
        runs = [("1 process", one_cmd, t, work / f"one-{i}-{t}") for t in args.one_threads or [args.cores]]
        runs.append((f"{n} processes", n_cmd, max(args.cores // n, 1), work / f"n-{i}"))
        for label, command, threads, out in runs:
            wall = run([*command, "--out", str(out), "--overwrite"], threads)
            timings = json.loads((out / "dsg_build.json").read_text())["guardrails"][-1]["timings"]
            rows.append((label, threads, wall, timings["statistics_s"], timings["statistics_tokens"]))
            print(f"{label}: {wall:.1f} s wall, pass {timings['statistics_s']:.1f} s", file=sys.stderr)
    print("| run | OMP_NUM_THREADS per process | wall s | statistics pass s | tokens |")
    print("|---|---|---|---|---|")
    for label, threads, wall, pass_s, tokens in rows:
        print(f"| {label} | {threads} | {wall:.1f} | {pass_s:.1f} | {tokens:,} |")
    for t in args.one_threads or [args.cores]:
        print(f"1 process ({t} threads) against {n}:", json.dumps(same_build(work / f"one-0-{t}", work / "n-0")))


if __name__ == "__main__":
    main()
