"""`dsg demo`: the whole path on the embedded default, with no options needed.

Model: SmolLM2-135M-Instruct from the shared folder (GGUF, converted once to a cached safetensors
folder). SAE: the one this project trained and ships in `modeling_dsg/embedded/sae/`. Forget: the build split of
the WMDP-bio questions and MMLU biology-subject questions. Retain: non-biology MMLU questions and WikiText. Every
question comes in the three formats users send (bare, with the lm-eval preamble, through the chat template) on
both sides, so format features do not pass the selection and the gate is fit and calibrated on those formats.

The guardrail (`DEMO_OPTIONS`): score "features" (N = 20 features and their integer weights fit on whole build
prompts; rho is the weights of the features active somewhere in any 32 tokens, at best) and tau from a false-positive
bound (2.5%); `dsg results` measures it against the other gates (its "gates" section), and
`experiments/guard-v2/feature-gate` maps its N, window and bound.

It builds a biology guardrail, prints tau, the selected features with their top tokens, the trigger
rates on held-out prompts (never used to build), and a biology and a non-biology greedy generation,
base next to DSG; then writes the model folder (loadable with `trust_remote_code=True`).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import DSGError
from ..paths import PACKAGE_DIR, SHIPPED
from ..pipelines.build import DEFAULT_CLAMP, BuildOptions
from .data import seeded_sample

SAE_DIR = PACKAGE_DIR / SHIPPED["sae"]
DEMO_OPTIONS = dict(
    name="biology",
    mode="dynamic",
    n_features=20,
    clamp=DEFAULT_CLAMP,
    ratio_percentile=95.0,
    # features and integer weights fit on the build prompts; rho: the weights of the features active somewhere in
    # any 32 tokens, at best (filler around a question cannot dilute it). Every option here that decides the
    # guardrail is also `dsg build`'s default, so `dsg build` with no flags builds this guardrail from these corpora
    score="features",
    window=32,
    target_fpr=0.025,  # the smallest tau whose 95% Clopper-Pearson bound on the retain firing rate is <= 2.5%
    seq_len=256,
    packing=False,
    max_docs=2048,
    heldout_fraction=0.2,
    batch_size=16,
    seed=0,
)
HELDOUT_SAMPLE = 400  # held-out prompts per set (a seeded sample), to keep the demo within minutes


def default_sae() -> Path:
    found = sorted(SAE_DIR.glob("smollm2-135m-layer*/cfg.json"))
    if not found:
        raise DSGError(f"no shipped SAE found under {SAE_DIR} (expected smollm2-135m-layerN/cfg.json); pass --sae")
    return found[0].parent


def _generate(model, tokenizer, prompt, max_new_tokens):
    """Greedy answer to `prompt` as a chat user turn; returns (text, where a guardrail first fired or None).

    "Fired" means at any point of the generation: on the prompt, or at a later new token."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), model.record_guardrails() as records:
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True), _first_firing(records)


def _first_firing(records):
    """'NAME on the prompt' or 'NAME at new token K' for the first guardrail decision that fired, or None."""
    calls: dict = {}
    for record in records:
        step = calls[record["guardrail"]] = calls.get(record["guardrail"], -1) + 1
        if bool(record["fired"][0]):
            return f"{record['guardrail']} {'on the prompt' if step == 0 else f'at new token {step}'}"
    return None


def _label(fired, guarded, plain):
    """What happened to a generation, said only from what was measured."""
    same = "identical to base" if guarded == plain else "differs from base"
    return f"guardrail fired ({fired}); {same}" if fired else f"not fired; {same}"


def _show(text, width=100):
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run_demo(
    out: str | Path = "dsg-demo",
    *,
    sae: str | None = None,
    overwrite: bool = False,
    heldout_sample: int = HELDOUT_SAMPLE,
    max_new_tokens: int = 32,
    device: str = "cpu",
) -> dict:
    from ..analysis.decisions import guard_decisions
    from ..data.sources import load_base_model, load_sae, sae_layer
    from ..outputs import prepare_output
    from ..paths import atomic_output_dir, shared_dir
    from ..pipelines.build import assemble, build_guardrail, write_folder
    from . import data as embedded

    t0 = time.perf_counter()
    out = prepare_output(
        out,
        overwrite,
        inputs={
            "the --sae folder": sae,
            "the shipped SAE folder": SAE_DIR,
            "the shared models/data folder": shared_dir(required=False),
        },
    )
    gguf = embedded.gguf_path()
    if not gguf.is_file():
        raise DSGError(f"the embedded model is missing: {gguf}")
    sae_path = Path(sae) if sae else default_sae()

    print(f"[1/5] base model: {gguf.name}")
    start = time.perf_counter()
    base, tokenizer = load_base_model(str(gguf), device=device)
    print(f"      loaded in {time.perf_counter() - start:.1f} s")
    sae_obj = load_sae(str(sae_path))
    print(
        f"      SAE: {sae_path.name} ({sae_obj.cfg.architecture()}, d_sae {sae_obj.cfg.d_sae}, "
        f"layer {sae_layer(sae_obj)})"
    )

    print("[2/5] corpora (build split; held-out questions are never used here)")
    forget, retain = embedded.forget_texts("build", tokenizer), embedded.retain_texts("build", tokenizer)
    print(f"      forget: {len(forget)} prompts (WMDP-bio + MMLU biology questions; bare, preamble, chat)")
    print(f"      retain: {len(retain)} texts (non-biology MMLU questions in the three formats, WikiText bare + chat)")

    print("[3/5] statistics pass, selection and calibration")
    options = BuildOptions(**DEMO_OPTIONS, device=device)
    result = build_guardrail(
        base, tokenizer, sae_obj, forget, retain, options, sae_source=str(sae_path), sae_layer=sae_layer(sae_obj)
    )
    result.info["forget_sources"] = [
        "embedded: WMDP-bio build split (bare, lm-eval preamble, chat template)",
        "MMLU biology subjects (build split, the same three formats)",
    ]
    result.info["retain_sources"] = [
        "embedded: WikiText-2 (build articles; bare and as a chat turn)",
        "MMLU non-biology subjects (build split, the three formats)",
    ]
    info = result.info
    timings = info["timings"]
    print(
        f"      {timings['statistics_tokens']} tokens in {timings['statistics_s']:.1f} s; "
        f"selection {timings['selection_s'] * 1000:.1f} ms, calibration {timings['calibration_s'] * 1000:.1f} ms"
    )
    calibration = info["calibration"]
    rule = (
        f"retain firing rate {calibration['retain_fpr']:.3f}, its 95% bound {calibration['retain_fpr_upper95']:.3f} "
        f"<= {calibration['target_fpr']:g}"
        if calibration["rule"] == "target_fpr"
        else f"{calibration['threshold_percentile']:g}th percentile of rho on retain rows"
    )
    print(f"      tau = {info['tau']:.4f} ({rule})")
    gate = result.guardrail
    if gate.get("score") == "features":
        print(
            f"      feature gate: rho = the weights of the features active in any {gate['window']} tokens, at best, "
            f"over {sum(w for w in gate['token_weights'] if w > 0)}; weights {gate['token_weights']}"
        )
    elif "token_weights" in gate:
        print(
            f"      token gate: a token is flagged at {gate['token_threshold']} points; "
            f"weights {gate['token_weights']}"
        )
    print(f"      {len(result.features)} features (index: top tokens):")
    for feature in result.features:
        tops = []
        for t in feature["top_tokens"]:
            if t["token"] not in tops:
                tops.append(t["token"])
        print(f"        #{feature['index']:<6} ratio {feature['ratio']:9.3g}  " + ", ".join(repr(t) for t in tops[:5]))
    model = assemble(base, tokenizer, [result])

    print("[4/5] trigger rates on held-out prompts")
    prompts = embedded.heldout_prompts()
    sets = {
        name: seeded_sample(texts, heldout_sample, seed=i) for i, (name, texts) in enumerate(sorted(prompts.items()))
    }
    rates = {}
    for name, texts in sets.items():
        decisions = guard_decisions(model, tokenizer, texts, desc=f"held-out {name}")[options.name]
        rates[name] = {"trigger_rate": float(decisions["fired"].double().mean()), "n": len(texts)}
        print(f"      {name:<12} {rates[name]['trigger_rate']:6.3f}  ({len(texts)} prompts)")
    info["heldout_prompts"] = rates

    print("[5/5] greedy generations (chat template), base next to DSG")
    examples = {"biology": sets["bio"][0], "non-biology": sets["mmlu_nonbio"][0]}
    generations = {}
    for kind, prompt in examples.items():
        with model.guardrails_disabled():
            plain, _ = _generate(model, tokenizer, prompt, max_new_tokens)
        guarded, fired = _generate(model, tokenizer, prompt, max_new_tokens)
        generations[kind] = {
            "prompt": prompt,
            "base": plain,
            "dsg": guarded,
            "fired": fired is not None,
            "fired_at": fired,
            "identical_to_base": guarded == plain,
        }
        print(f"      {kind} prompt: {_show(prompt)}")
        print(f"        base: {_show(plain)}")
        print(f"        DSG : {_show(guarded)}   [{_label(fired, guarded, plain)}]")
    info["generations"] = generations

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_folder(model, tokenizer, tmp, [result], "HuggingFaceTB/SmolLM2-135M-Instruct")
    info["wall_time_s"] = time.perf_counter() - t0
    print(f"wrote {out}  (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
    print(f"demo wall time {info['wall_time_s']:.0f} s")
    return info


def configure_parser(p):
    p.add_argument("--out", default="dsg-demo", help="the model folder to write (default: ./dsg-demo)")
    p.add_argument("--sae", help="an SAE folder (default: the shipped one in modeling_dsg/embedded/sae/)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--heldout-sample", type=int, default=HELDOUT_SAMPLE, help="held-out prompts per set")
    p.add_argument("--device", default="cpu")


def run(args):
    run_demo(args.out, sae=args.sae, overwrite=args.overwrite, heldout_sample=args.heldout_sample, device=args.device)
