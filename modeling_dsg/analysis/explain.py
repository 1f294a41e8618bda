"""`dsg explain DIR TEXT`: why each guardrail did or did not fire on a text.

For every guardrail it prints rho against tau, the decision, its action and what a user sees when it
fires (`when_fired`, which the model card says too), and each token on which a selected feature fired,
with the features' activations and (from `features.json`) their top tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DSGError


def when_fired(action: str, *, clamp=None, refusal: str | None = None, minus: str = "−") -> str:
    """What a user sees when a guardrail with this action fires, as one sentence without a final period (the
    card and `dsg explain` both say it). `clamp` is the clamp value as shown, `refusal` the refusal text as
    shown (quoted by the caller)."""
    if action == "clamp":
        return (
            f"the selected features are set to {minus}{clamp} at every flagged token, so the answer is the edited "
            "model's from the first flagged token on: fluent with a small clamp, degraded or off-topic text with a "
            "large one (such as the paper's 500)"
        )
    if action == "refuse":
        return f"the answer is exactly the refusal {refusal}, then end of sequence; nothing else is generated"
    if action == "monitor":
        return (
            "nothing changes: the answer is the base model's, token for token; the decision is only reported, "
            "on the model outputs (`guardrail_decisions`)"
        )
    return f"action `{action}` (not one this version of modeling_dsg describes)"


def explain(model, tokenizer, text: str, *, chat: bool = False, features_info: dict | None = None) -> list[dict]:
    """Run `text` through a DSG model and return, per guardrail, its score, decision and firing tokens."""
    import torch

    if not text.strip():
        raise DSGError("the text to explain is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DSGError("--chat: this tokenizer has no chat template")
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tokenizer(text, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), model.record_guardrails() as records:
        model(**enc)
    ids = enc["input_ids"][0].tolist()
    tokens = [tokenizer.decode([i]) for i in ids]
    by_name = {g.get("name"): g for g in (features_info or {}).get("guardrails", []) if isinstance(g, dict)}
    out = []
    for record, guard in zip(records, model.guards):
        acts = record["acts"][0].float().cpu()
        counted = record["counted"][0].cpu()
        weights = guard.token_weights  # None: a token is flagged when any selected feature is active
        scoring = record["flags"][0].cpu()  # the tokens that add to rho: flagged, or with points any that score
        if getattr(guard, "points", False):
            scoring = counted & (guard.token_points(acts > 0) > 0)
        rows = []
        for pos in torch.nonzero(scoring).flatten().tolist():
            active = [(j, float(acts[pos, j])) for j in torch.nonzero(acts[pos] > 0).flatten().tolist()]
            features = [
                {"index": guard.features[j], "activation": round(a, 4), **({"weight": weights[j]} if weights else {})}
                for j, a in sorted(active, key=lambda x: -x[1])
            ]
            row = {"position": pos, "token": tokens[pos], "features": features}
            if weights:
                row["points"] = sum(weights[j] for j, _ in active)
            rows.append(row)
        known = {f.get("index"): f for f in by_name.get(guard.name, {}).get("features", []) if isinstance(f, dict)}
        fired = set(f["index"] for r in rows for f in r["features"])
        action = getattr(guard, "action", "clamp")
        refusal = guard.refusal if action == "refuse" else None
        out.append(
            {
                "guardrail": guard.name,
                "layer": guard.layer,
                "mode": guard.mode,
                "action": action,
                **({"refusal": refusal} if action == "refuse" else {}),
                "when_fired": when_fired(action, clamp=f"{guard.clamp:g}", refusal=repr(refusal), minus="-"),
                "rho": float(record["rho"][0]),
                "tau": guard.threshold,
                "fired": bool(record["fired"][0]),
                "token_gate": (
                    {
                        "threshold": guard.token_threshold,
                        "weights": dict(zip(guard.features, weights)),
                        **({"value": "points", "most_points": guard.point_scale} if guard.points else {}),
                    }
                    if weights
                    else None
                ),
                **(
                    {"best_window": best_feature_window(guard, acts > 0, counted)} if guard.score == "features" else {}
                ),
                "counted_tokens": int(counted.sum()),
                "flagged_tokens": int(record["flags"][0].sum()),
                "tokens": rows,
                "features": {i: _distinct_tokens(known[i]) for i in sorted(fired) if i in known},
            }
        )
    return out


def best_feature_window(guard, active, counted) -> dict:
    """Score "features": the first window of the text with the most points (the one rho comes from), as the
    positions of its first and last counted tokens, the selected features active somewhere in it with their
    weights, and its points (floored at 0) out of the most a window can have."""
    positions = counted.nonzero().flatten().tolist()
    best = {"first": None, "last": None, "features": {}, "points": 0, "most_points": guard.point_scale}
    for end in range(len(positions)):
        window = positions[max(0, end - guard.window + 1) : end + 1]
        seen = active[window].any(0)
        features = {guard.features[j]: guard.token_weights[j] for j in seen.nonzero().flatten().tolist()}
        points = max(sum(features.values()), 0)
        if best["first"] is None or points > best["points"]:
            best.update(first=window[0], last=window[-1], features=features, points=points)
    return best


def _distinct_tokens(feature: dict, k: int = 5) -> list[str]:
    """The first k distinct tokens among a feature's top activations (features.json), best first."""
    top = feature.get("top_tokens") or []
    return list(dict.fromkeys(t["token"] for t in top if isinstance(t, dict) and isinstance(t.get("token"), str)))[:k]


def format_report(results: list[dict]) -> str:
    lines = []
    for r in results:
        verdict = "FIRED" if r["fired"] else "not fired"
        relation = ">" if r["rho"] > r["tau"] else "<="
        lines.append(
            f"guardrail {r['guardrail']!r} (layer {r['layer']}, {r['mode']}, action {r['action']}): "
            f"rho = {r['rho']:.3f} {relation} tau = {r['tau']:.3f} -> {verdict}  "
            f"({r['flagged_tokens']} of {r['counted_tokens']} tokens flagged)"
        )
        lines.append(f"  when it fires: {r['when_fired']}")
        gate = r.get("token_gate")
        window = r.get("best_window")
        if window is not None:
            seen = ", ".join(f"#{i} {w:+d}" for i, w in window["features"].items()) or "none"
            where = f"tokens {window['first']}..{window['last']}" if window["first"] is not None else "no tokens"
            lines.append(
                f"  rho is the best window's points (floored at 0) over the most a window can have: "
                f"{window['points']} of {window['most_points']}, in {where}, whose features are {seen}"
            )
            gate = None  # the features' weights are listed above; a token's own points are shown below
        if gate:
            weights = ", ".join(f"#{i} {w:+d}" for i, w in gate["weights"].items())
            lines.append(
                f"  a token is flagged when its active features' weights add up to {gate['threshold']}: {weights}"
            )
            if gate.get("value") == "points":
                lines.append(
                    f"  rho adds each token's points (floored at 0) over the most a token can have "
                    f"({gate['most_points']}); the tokens that score:"
                )
        for row in r["tokens"]:
            feats = ", ".join(f"#{f['index']} ({f['activation']:.2f})" for f in row["features"])
            points = f"  [{row['points']} points]" if "points" in row else ""
            lines.append(f"  {row['position']:>4}  {row['token']!r:<18} {feats}{points}")
        for index, top in r["features"].items():
            lines.append(f"  feature #{index} top tokens: {', '.join(repr(t) for t in top)}")
    return "\n".join(lines)


def load_for_explain(folder):
    from ..data.records import FEATURES_FILE, read_record
    from ..data.sources import load_dsg_model, read_json_file

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise DSGError(f"{folder} is not a model folder (no config.json)")
    config = read_json_file(folder / "config.json", "model config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(config, dict):
        raise DSGError(
            f"{folder}/config.json is not a valid config: it holds a JSON {type(config).__name__}, not an object"
        )
    if model_type != "dsg":
        raise DSGError(f"{folder} is not a DSG model (model_type {model_type!r}); build one with `dsg build`")
    info = read_record(folder / FEATURES_FILE)  # a misshapen features.json fails before the model loads
    model, tokenizer, _ = load_dsg_model(folder, device=None)
    return model, tokenizer, info


def read_text_arg(text: str) -> str:
    """The TEXT argument; '-' reads standard input, which must be UTF-8."""
    import sys

    if text != "-":
        try:  # bytes that are not UTF-8 reach argv as lone surrogates
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DSGError("the text to explain is not UTF-8 (it holds bytes that are not UTF-8 text)") from None
        return text
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests, embedding)
        return sys.stdin.read()
    from ..data.sources import decode_text

    return decode_text(buffer.read(), "standard input")


def configure_parser(p):
    p.add_argument("dir", metavar="DIR", help="a DSG model folder")
    p.add_argument("text", metavar="TEXT", help="the text to explain ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the text in the model's chat template as a user turn")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args):
    text = read_text_arg(args.text)
    model, tokenizer, info = load_for_explain(args.dir)
    results = explain(model, tokenizer, text, chat=args.chat, features_info=info)
    if not results and not args.json:
        print(f"{args.dir} has no guardrails: nothing to explain")
        return
    print(json.dumps(results, indent=2) if args.json else format_report(results))
