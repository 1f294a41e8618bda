"""RMU, the gradient-unlearning baseline: Representation Misdirection for Unlearning.

Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", section 5.
The project's own implementation, written from the paper's description, on the same models, corpora
and token rows as `dsg build`, so the two can be compared for efficacy and for wall time.

The method
    Pick a decoder layer l and let h(x) be the residual stream after block l (the output of
    `decoder_layers(model)[l]`, the point a DSG guardrail at layer l reads). Only a few weights are
    trained: by default the MLP output projection (`mlp.down_proj` in Llama-style blocks) of blocks
    l-2, l-1 and l. The reference h_frozen comes from the same model with those weights at their
    original values. With a fixed random unit vector u and a steering coefficient c, each step takes
    one forget batch and one retain batch and minimises

        L = mean_{t in forget} ||h_upd(t) - c u||^2 / d
            + alpha * mean_{t in retain} ||h_upd(t) - h_frozen(t)||^2 / d

    (means over real tokens; d the hidden size: the squared error is averaged over the hidden
    dimensions as well, like torch's `mse_loss`, which keeps alpha on the paper's scale). The forget
    term scrambles the representation of forget text at layer l (later layers receive noise of large
    norm along u); the retain term keeps everything else where it was.

Tokens
    Padding never counts (attention_mask == 0). In the forget term BOS does not count either: BOS
    at position 0 has the same representation for every input (an attention sink with an outlier
    norm), so steering it would steer every input. In the retain term it counts (it must stay put).

Only layers 0..l run
    Neither term needs anything after block l: a forward hook on block l captures its output and
    stops the forward by raising (as `stats.collect` does), so the later blocks and the LM head never
    run, and the backward pass only reaches blocks l-2..l. At a quarter of the depth this makes a step
    several times cheaper than with full forwards.

Defaults and why
    layer          round(7 * n_layers / 32): the paper's layer 7 of 32 (zephyr-7b), 7 of SmolLM2's 30.
    update_layers  l-2, l-1, l (the paper's choice).
    update_params  the MLP output projection of each block (`mlp.down_proj`; `mlp.c_proj` for GPT-2,
                   `mlp.fc2`, `mlp.dense_4h_to_h`), the paper's choice; add `mlp.up_proj` etc. at will.
    steering_coeff None: c = multiplier * mean ||h_frozen(t)|| over the forget tokens of the first
                   `norm_rows` forget rows (seeded order). The paper's absolute c = 6.5 suits
                   zephyr-7b's activation scale only (its published training log shows mean forget norms
                   of 2.2-3.2 at layer 7, so c was 2-3 times the norm); SmolLM2-135M's norm at layer 7
                   is about 118 (its BOS, an outlier, about 770). Tying c to the model's own norm
                   transfers across models; pass steering_coeff for an absolute c.
    multiplier     3: the upper end of the paper's ratio; measured to work on SmolLM2 (below).
    alpha          100 (the reference code's default). The paper's zephyr value, 1200, held SmolLM2's
                   forget term almost still (248.6 -> 240.2 in 60 steps at lr 1e-3; held-out WMDP-bio
                   NLL +0.06). With c tied to the norm, both terms scale with the norm squared, so alpha
                   does not depend on the activation scale.
    lr             1e-3. The paper's 5e-5 is for 7B models, whose MLPs are wider (an Adam step moves
                   their outputs much more relative to their activation norm); on SmolLM2-135M the
                   forget term barely moves at 5e-5 (248.6 -> 246.9 in 25 steps, alpha 100, against
                   248.6 -> 211.4 at 1e-3). Use the paper's 5e-5 for 7B models.
    steps, rows    60 steps of 4 forget rows and 4 retain rows of 256 tokens (the paper: 150 batches of
                   4 at up to 512 tokens; on SmolLM2 60 x 4 x 256 already raises held-out WMDP-bio NLL
                   by several nats while non-biology NLL moves by a few hundredths, see below).
    u              entries uniform in [0, 1) (the paper's sampling), normalised to unit length, from
                   `seed`.
    optimiser      AdamW (torch defaults besides lr).
    rows           `rows.build_rows` with `dsg build`'s defaults (documents > 50 characters, up to 1024,
                   packed with EOS into rows that start with BOS). Each step draws the next forget and
                   the next retain batch; a set that runs out is reshuffled (seeded) and reused.

Measured on the embedded default (`nice -n 10 python -m modeling_dsg.pipelines.rmu`: SmolLM2-135M-Instruct,
forget = `embedded.forget_texts("build")`, retain = `embedded.retain_texts("build")`, default options,
fp32 on 2 shared CPU cores): c = 355.9 (3 x 118.6); 60 steps, 122,880 tokens (half forget, half
retain) in 310 s of training (396 tokens/s; 334 s for `rmu_unlearn` in all); the forget term fell from
248.6 to 84.6 and the forget norm rose from 117 to 266. Per-token NLL on the first 32 held-out prompts
of each set, base -> RMU: WMDP-bio 3.131 -> 10.014, MMLU biology 3.353 -> 8.284, MMLU non-biology
3.562 -> 3.584, WikiText 3.949 -> 3.960. Two runs gave identical losses (seeded).

Output of `run_rmu`: a plain Hugging Face model folder (config, weights, generation config, tokenizer)
plus `rmu.json` (the returned info, sources and options), written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DSGError

RMU_FILE = "rmu.json"
# The MLP output projection of a decoder block, by family (tried in this order).
MLP_OUTPUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "feed_forward.w2")


@dataclass
class RMUOptions:
    """Every knob of an RMU run (see the module docstring for the reasons behind the defaults)."""

    layer: int | None = None  # default: round(7 * n_layers / 32)
    update_layers: tuple[int, ...] | None = None  # default: (layer - 2, layer - 1, layer), those >= 0
    update_params: tuple[str, ...] | None = None  # module names inside a block; default: the MLP output projection
    steering_coeff: float | None = None  # c; default: multiplier * mean forget activation norm
    multiplier: float = 3.0
    norm_rows: int = 32  # forget rows used to measure the mean activation norm
    alpha: float = 100.0
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 256
    min_chars: int = 50
    max_docs: int | None = 1024
    packing: bool = True
    seed: int = 0
    device: str | None = None  # move the model there first (run_rmu loads it there; default "cpu")


def default_layer(n_layers: int) -> int:
    """round(7 * n_layers / 32): the paper's depth ratio (layer 7 of zephyr-7b's 32)."""
    return min(n_layers - 1, int(7 * n_layers / 32 + 0.5))


def _check_options(options: RMUOptions) -> None:
    import math

    for flag in ("lr", "alpha", "multiplier", "steering_coeff"):
        value = getattr(options, flag)
        if value is not None and not math.isfinite(value):
            raise DSGError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    checks = [
        (options.steps >= 1, f"steps must be at least 1, got {options.steps}"),
        (options.batch_size >= 1, f"batch_size must be at least 1, got {options.batch_size}"),
        (options.seq_len >= 2, f"seq_len must be at least 2, got {options.seq_len}"),
        (options.lr > 0, f"lr must be > 0, got {options.lr}"),
        (options.alpha >= 0, f"alpha must be >= 0, got {options.alpha}"),
        (options.multiplier > 0, f"multiplier must be > 0, got {options.multiplier}"),
        (
            options.steering_coeff is None or options.steering_coeff > 0,
            f"steering_coeff must be > 0, got {options.steering_coeff}",
        ),
        (options.norm_rows >= 1, f"norm_rows must be at least 1, got {options.norm_rows}"),
        (options.max_docs is None or options.max_docs >= 1, f"max_docs must be at least 1, got {options.max_docs}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DSGError(message)


# ------------------------------------------------------------------------------------ forward to l
class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass after block l."""


def layer_hidden(model, layer: int, input_ids, attention_mask, params: dict | None = None):
    """The output of decoder block `layer` (the residual stream after it), [B, T, d].

    The forward stops right after that block. `params` (name -> tensor) replaces those parameters for
    this call only (`torch.func.functional_call`); gradients flow as in a normal forward.
    """
    from torch.func import functional_call

    from ..runtime.modeling_dsg import decoder_layers

    captured = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    try:
        if params:
            functional_call(model, params, args=(), kwargs=kwargs)
        else:
            model(**kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise DSGError(f"decoder layer {layer} never ran during the forward pass")
    return captured[0]


# ------------------------------------------------------------------------------------- parameters
def resolve_update_params(model, options: RMUOptions) -> tuple[int, list[int], dict]:
    """(layer, update_layers, {full parameter name: parameter}) for `options`; DSGError if out of range."""
    from ..runtime.modeling_dsg import decoder_layers

    try:
        blocks = decoder_layers(model)
    except ValueError as err:
        raise DSGError(str(err)) from None
    n = len(blocks)
    layer = default_layer(n) if options.layer is None else options.layer
    if not 0 <= layer < n:
        raise DSGError(f"layer {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
    if options.update_layers is None:
        update = [i for i in (layer - 2, layer - 1, layer) if i >= 0]
    else:
        given = options.update_layers
        update = sorted(set(int(i) for i in ((given,) if isinstance(given, int) else given)))
        if not update:
            raise DSGError("update_layers is empty: name at least one layer to update")
        bad = [i for i in update if not 0 <= i <= layer]
        if bad:
            raise DSGError(
                f"update layers {bad} are out of range: they must be in 0..{layer} (the layer "
                f"whose output RMU steers; later layers cannot change it)"
            )

    names = options.update_params
    if isinstance(names, str):
        names = (names,)
    if names is None:
        names = _default_params(blocks[layer])
        if names is None:
            raise DSGError(
                f"cannot find the MLP output projection in {type(blocks[layer]).__name__} "
                f"(tried {', '.join(MLP_OUTPUT_NAMES)}); pass update_params"
            )
    if not names:
        raise DSGError("update_params is empty: name at least one module inside a block, e.g. mlp.down_proj")

    block_prefix = {id(b): None for b in blocks}
    for full_name, module in model.named_modules():
        if id(module) in block_prefix and block_prefix[id(module)] is None:
            block_prefix[id(module)] = full_name
    selected = {}
    for i in update:
        prefix = block_prefix[id(blocks[i])]
        for name in names:
            try:
                sub = blocks[i].get_submodule(name)
            except AttributeError:
                raise DSGError(f"block {i} ({type(blocks[i]).__name__}) has no module {name!r}") from None
            weight = getattr(sub, "weight", None)
            if weight is None:
                raise DSGError(f"module {name!r} of block {i} has no weight to update")
            selected[f"{prefix}.{name}.weight"] = weight
    return layer, update, selected


def _default_params(block):
    for m in MLP_OUTPUT_NAMES:
        try:
            block.get_submodule(m)
            return (m,)
        except AttributeError:
            continue
    return None


# ------------------------------------------------------------------------------------------ rows
def _rows(texts, tokenizer, options: RMUOptions, corpus: str):
    from ..data.rows import Rows, build_rows

    if isinstance(texts, Rows):
        rows = texts
    else:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise DSGError(f"{corpus} corpus is empty")
        try:
            rows = build_rows(
                texts,
                tokenizer,
                seq_len=options.seq_len,
                min_chars=options.min_chars,
                max_docs=options.max_docs,
                packing=options.packing,
                seed=options.seed,
            )
        except DSGError as err:
            raise DSGError(f"{corpus} corpus: {err}") from None
    if len(rows) == 0 or int(rows.attention_mask.sum()) == 0:
        raise DSGError(f"{corpus} corpus has no tokens")
    return rows


class _Batches:
    """Endless batches of rows: a seeded permutation per pass, the next pass when one runs out."""

    def __init__(self, rows, batch_size: int, seed: int):
        import torch

        self.rows, self.batch_size = rows, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.at, self.passes = None, 0, 0

    def __next__(self):
        import torch

        index = []
        while len(index) < self.batch_size:
            if self.order is None or self.at >= len(self.order):
                self.order, self.at = torch.randperm(len(self.rows), generator=self.gen), 0
                self.passes += 1
            take = self.order[self.at : self.at + self.batch_size - len(index)]
            index += take.tolist()  # with fewer rows than a batch, a batch holds some rows twice
            self.at += len(take)
        batch = self.rows.select(torch.tensor(index))
        width = int(batch.attention_mask.long().cumsum(1).argmax(1).max()) + 1  # cut trailing padding
        return batch.input_ids[:, :width], batch.attention_mask[:, :width]


def _masked_mse(diff, mask):
    """mean over tokens with mask of ||diff||^2 / d."""
    m = mask.to(diff.dtype).unsqueeze(-1)
    return (diff.pow(2) * m).sum() / (m.sum().clamp(min=1) * diff.shape[-1])


def _forget_mask(ids, mask, tokenizer):
    keep = mask.bool()
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        keep = keep & (ids != bos)
    return keep


def steering_vector(d: int, seed: int):
    """u: entries uniform in [0, 1), normalised to unit length (the paper's sampling), float32 [d]."""
    import torch

    u = torch.rand(d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


# ----------------------------------------------------------------------------------------- train
def rmu_unlearn(model, tokenizer, forget_texts, retain_texts, options: RMUOptions | None = None) -> dict:
    """Unlearn the forget corpus with RMU; `model` is modified in place (only its selected MLP weights).

    `forget_texts` / `retain_texts`: lists of documents (made into rows with `rows.build_rows`) or
    ready `rows.Rows`. Returns the run's record: layer, updated parameters, c, per step (`losses`) the
    forget term, the retain term (before the alpha weight) and `forget_norm` (mean ||h_upd|| over the
    forget batch's tokens, which rises toward c as RMU takes hold), tokens, wall time, options.
    """
    import torch
    from tqdm.auto import tqdm

    from ..runtime.modeling_dsg import decoder_layers

    options = options or RMUOptions()
    _check_options(options)
    start = time.perf_counter()
    if options.device:
        model.to(options.device)
    layer, update_layers, params = resolve_update_params(model, options)
    n_layers = len(decoder_layers(model))
    forget = _rows(forget_texts, tokenizer, options, "forget")
    retain = _rows(retain_texts, tokenizer, options, "retain")
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device):
        device = next(model.parameters()).device

    frozen = {name: p.detach().clone() for name, p in params.items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # no dropout: h_upd and h_frozen differ only by the weights
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    def hidden(ids, mask, weights=None):
        return layer_hidden(model, layer, ids.to(device), mask.to(device), weights)

    try:
        # c from the frozen model's activation norm on forget rows (first norm_rows of a seeded order)
        d = model.config.get_text_config().hidden_size
        u = steering_vector(d, options.seed).to(device)
        norm = None
        if options.steering_coeff is None:
            order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(options.seed))[
                : options.norm_rows
            ]
            total, count = 0.0, 0
            with torch.no_grad():
                for i in range(0, len(order), options.batch_size):
                    batch = forget.select(order[i : i + options.batch_size])
                    h = hidden(batch.input_ids, batch.attention_mask).float()
                    keep = _forget_mask(batch.input_ids, batch.attention_mask, tokenizer).to(device)
                    total += float(h.norm(dim=-1)[keep].sum())
                    count += int(keep.sum())
            if count == 0:
                raise DSGError("forget corpus has no tokens besides BOS and padding")
            norm = total / count
            coeff = options.multiplier * norm
        else:
            coeff = float(options.steering_coeff)
        target = coeff * u

        optimizer = torch.optim.AdamW(list(params.values()), lr=options.lr)
        forget_batches = _Batches(forget, options.batch_size, options.seed)
        retain_batches = _Batches(retain, options.batch_size, options.seed + 1)
        losses = {"forget": [], "retain": [], "forget_norm": []}
        tokens = {"forget": 0, "retain": 0}
        train_start = time.perf_counter()
        bar = tqdm(range(options.steps), desc="rmu", unit="step")
        for _ in bar:
            f_ids, f_mask = next(forget_batches)
            r_ids, r_mask = next(retain_batches)
            f_keep = _forget_mask(f_ids, f_mask, tokenizer).to(device)
            r_keep = r_mask.bool().to(device)
            h_f = hidden(f_ids, f_mask)
            forget_loss = _masked_mse(h_f.float() - target, f_keep)
            h_r = hidden(r_ids, r_mask)
            with torch.no_grad():
                h_r_frozen = hidden(r_ids, r_mask, frozen)
            retain_loss = _masked_mse(h_r.float() - h_r_frozen.float(), r_keep)
            loss = forget_loss + options.alpha * retain_loss
            if not torch.isfinite(loss):  # diverged: stop at once (run_rmu then writes nothing)
                raise DSGError(
                    f"RMU diverged at step {len(losses['forget']) + 1}: the loss is {loss.item():g} "
                    f"(lr {options.lr:g}, c = {coeff:.4g}, alpha {options.alpha:g}); lower --lr or "
                    "--steering-coeff"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses["forget"].append(forget_loss.item())
            losses["retain"].append(retain_loss.item())
            with torch.no_grad():
                norms = h_f.float().norm(dim=-1)[f_keep]
                losses["forget_norm"].append(norms.mean().item())
            tokens["forget"] += int(f_mask.sum())
            tokens["retain"] += int(r_mask.sum())
            bar.set_postfix(
                forget=f"{losses['forget'][-1]:.4g}",
                retain=f"{losses['retain'][-1]:.3g}",
                norm=f"{losses['forget_norm'][-1]:.4g}",
            )
        train_s = time.perf_counter() - train_start
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)

    n_tokens = tokens["forget"] + tokens["retain"]
    return {
        "method": "rmu",
        "layer": layer,
        "n_layers": n_layers,
        "update_layers": update_layers,
        "updated_parameters": sorted(params),
        "n_updated_parameters": int(sum(p.numel() for p in params.values())),
        "steering_coeff": float(coeff),
        "forget_activation_norm": norm,
        "alpha": options.alpha,
        "steps": options.steps,
        "rows": {
            "forget": len(forget),
            "retain": len(retain),
            "seq_len": forget.seq_len,
            "forget_passes": forget_batches.passes,
            "retain_passes": retain_batches.passes,
        },
        "tokens": {**tokens, "total": n_tokens},
        "losses": losses,
        "wall_s": time.perf_counter() - start,
        "train_s": train_s,
        "tokens_per_s": n_tokens / max(train_s, 1e-9),
        "options": asdict(options),
    }


# ------------------------------------------------------------------------------------ the folder
def _load_sources(specs, text_field=None) -> tuple[list[str], list[str]]:
    from ..data.sources import load_texts

    if isinstance(specs, (str, Path)):
        specs = [specs]
    specs = [str(s) for s in specs]
    if not specs:
        raise DSGError("no text source given")
    texts = []
    for spec in specs:
        texts += load_texts(spec, text_field=text_field)
    return texts, specs


def run_rmu(
    base: str,
    forget,
    retain,
    out,
    options: RMUOptions | None = None,
    overwrite: bool = False,
    text_field: str | None = None,
) -> dict:
    """Load `base` (folder, .gguf or Hub id) and the texts, run RMU, save a plain HF model folder.

    `forget` / `retain`: one text source or a list (`sources.load_texts`). The folder holds the
    unlearned model, its tokenizer and `rmu.json` (the `rmu_unlearn` record plus the sources and the
    total wall time including loading); it is written atomically. Returns that record.
    """
    from ..data.sources import load_base_model
    from ..outputs import prepare_output
    from ..paths import atomic_output_dir

    options = options or RMUOptions()
    _check_options(options)
    out_path = prepare_output(
        out, overwrite, inputs={"the --base model": base, "the --forget source": forget, "the --retain source": retain}
    )
    start = time.perf_counter()
    forget_texts, forget_specs = _load_sources(forget, text_field)  # cheap inputs first
    retain_texts, retain_specs = _load_sources(retain, text_field)
    model, tokenizer = load_base_model(base, device=options.device or "cpu")
    load_s = time.perf_counter() - start
    info = rmu_unlearn(model, tokenizer, forget_texts, retain_texts, options)
    info.update(
        base_model=str(base),
        forget_sources=forget_specs,
        retain_sources=retain_specs,
        load_s=load_s,
        total_s=time.perf_counter() - start,
    )
    check_rmu_finite(model, info)
    with atomic_output_dir(out_path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RMU_FILE).write_text(json.dumps(info, indent=2))
    return info


def check_rmu_finite(model, info: dict) -> None:
    """The unlearned weights (and the run's losses) are finite: a diverged run writes nothing."""
    import math

    from ..data.sources import check_finite

    hint = (
        f"RMU diverged (lr {info['options']['lr']:g}, c = {info['steering_coeff']:.4g}, alpha {info['alpha']:g}); "
        "lower --lr or --steering-coeff. Nothing was written"
    )
    try:
        check_finite(model.state_dict().items(), "the unlearned model")
    except DSGError as err:
        raise DSGError(f"{err}: {hint}") from None
    for term in ("forget", "retain"):
        bad = [i for i, v in enumerate(info["losses"][term]) if not math.isfinite(v)]
        if bad:
            raise DSGError(f"the {term} term is not finite from step {bad[0] + 1}: {hint}")


# ------------------------------------------------------------------------------------- the CLI
def configure_parser(p) -> None:
    d = RMUOptions()
    p.add_argument("--base", required=True, metavar="MODEL", help="Hub id, local folder or .gguf file")
    p.add_argument(
        "--forget",
        required=True,
        nargs="+",
        metavar="SRC",
        help=".txt/.jsonl/.parquet or Hub dataset NAME[:CONFIG][@SPLIT]",
    )
    p.add_argument("--retain", required=True, nargs="+", metavar="SRC", help="same kinds as --forget")
    p.add_argument("--out", required=True, metavar="DIR", help="the unlearned model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--layer", type=int, help="the layer whose output is steered (default: round(7 * n_layers / 32))")
    p.add_argument(
        "--update-layers",
        type=int,
        nargs="+",
        metavar="L",
        help="blocks whose weights train (default: layer-2..layer)",
    )
    p.add_argument(
        "--update-params",
        nargs="+",
        metavar="NAME",
        help="modules inside a block whose weight trains (default: the MLP output projection, e.g. mlp.down_proj)",
    )
    p.add_argument(
        "--steering-coeff", type=float, help="absolute c (default: --multiplier x mean forget activation norm)"
    )
    p.add_argument(
        "--multiplier",
        type=float,
        default=d.multiplier,
        help=f"c / mean forget activation norm (default {d.multiplier})",
    )
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"retain weight (default {d.alpha:g})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--min-chars", type=int, default=d.min_chars)
    p.add_argument("--max-docs", type=int, default=d.max_docs)
    p.add_argument(
        "--no-packing", dest="packing", action="store_false", help="one document per row instead of EOS-joined chunks"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--text-field", help="the JSONL/parquet field holding the text")
    p.add_argument("--device", default="cpu")


def options_from_args(args) -> RMUOptions:
    return RMUOptions(
        layer=args.layer,
        update_layers=tuple(args.update_layers) if args.update_layers else None,
        update_params=tuple(args.update_params) if args.update_params else None,
        steering_coeff=args.steering_coeff,
        multiplier=args.multiplier,
        alpha=args.alpha,
        lr=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        min_chars=args.min_chars,
        max_docs=args.max_docs,
        packing=args.packing,
        seed=args.seed,
        device=args.device,
    )


def run(args):
    info = run_rmu(
        args.base,
        args.forget,
        args.retain,
        args.out,
        options_from_args(args),
        overwrite=args.overwrite,
        text_field=args.text_field,
    )
    f, r = info["losses"]["forget"], info["losses"]["retain"]
    print(
        f"RMU at layer {info['layer']}, updating {len(info['updated_parameters'])} weights "
        f"({info['n_updated_parameters']:,} parameters), c = {info['steering_coeff']:.4g}, alpha = {info['alpha']:g}"
    )
    print(f"forget term {f[0]:.4g} -> {f[-1]:.4g}, retain term {r[0]:.3g} -> {r[-1]:.3g} over {info['steps']} steps")
    print(f"training {info['train_s']:.1f} s ({info['tokens_per_s']:.0f} tokens/s), total {info['total_s']:.1f} s")
    print(f"wrote {Path(args.out).resolve()}")


# ------------------------------------------------------------- measurement on the embedded default
def token_nll(model, tokenizer, texts, *, batch_size: int = 8, max_len: int = 512) -> float:
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

    from ..data.sources import load_base_model
    from ..embedded import data as embedded

    start = time.perf_counter()
    model, tokenizer = load_base_model(str(embedded.gguf_path()))
    load_s = time.perf_counter() - start
    base = copy.deepcopy(model)
    info = rmu_unlearn(model, tokenizer, embedded.forget_texts("build"), embedded.retain_texts("build"), options)
    start = time.perf_counter()
    nll = {}
    for name, texts in embedded.heldout_prompts().items():
        before, after = token_nll(base, tokenizer, texts[:n_eval]), token_nll(model, tokenizer, texts[:n_eval])
        nll[name] = {"base": before, "rmu": after, "delta": after - before}
    return {"info": info, "load_s": load_s, "eval_s": time.perf_counter() - start, "n_eval": n_eval, "nll": nll}


def _main(argv=None) -> None:  # python -m modeling_dsg.pipelines.rmu [--n-eval N] [--json PATH]
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
        f"{sum(n[-5:]) / 5:.1f}; retain term max {max(info['losses']['retain']):.4g}, last {info['losses']['retain'][-1]:.4g}"
    )
    print(f"held-out per-token NLL, first {result['n_eval']} prompts of each set ({result['eval_s']:.0f} s):")
    for name, v in result["nll"].items():
        print(f"  {name:12s} base {v['base']:.3f}  rmu {v['rmu']:.3f}  delta {v['delta']:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    _main()
