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
                   zephyr-7b's activation scale only (its published training log shows forget norms a
                   few times smaller than c at layer 7), while a small model's norm is two orders of
                   magnitude larger. Tying c to the model's own norm transfers across models; pass
                   steering_coeff for an absolute c.
    multiplier     3: the upper end of the paper's ratio.
    alpha          100 (the reference code's default; the paper's zephyr value, 1200, holds a small
                   model's forget term almost still). With c tied to the norm, both terms scale with
                   the norm squared, so alpha does not depend on the activation scale.
    lr             1e-3. The paper's 5e-5 is for 7B models, whose MLPs are wider (an Adam step moves
                   their outputs much more relative to their activation norm); on a 135M model the
                   forget term barely moves at 5e-5. Use the paper's 5e-5 for 7B models.
    steps, rows    60 steps of 4 forget rows and 4 retain rows of 256 tokens (the paper: 150 batches of
                   4 at up to 512 tokens).

What these defaults did on the embedded default is recorded in benchmarks/README.md
(`benchmarks/rmu_embedded.py`).
    u              entries uniform in [0, 1) (the paper's sampling), normalised to unit length, from
                   `seed`.
    optimiser      AdamW (torch defaults besides lr).
    rows           `rows.build_rows` with `dsg build`'s defaults (documents > 50 characters, up to 1024,
                   packed with EOS into rows that start with BOS). Each step draws the next forget and
                   the next retain batch; a set that runs out is reshuffled (seeded) and reused.

Output of `run_rmu`: a plain Hugging Face model folder (config, weights, generation config, tokenizer)
plus `rmu.json` (the returned info, sources and options), written atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.rows import ROW_HELP, row_option_checks
from ..data.sources import load_sources
from ..errors import DSGError, raise_first
from ..options import add_corpora, add_options, from_args, option

RMU_FILE = "rmu.json"
# The MLP output projection of a decoder block, by family (tried in this order).
MLP_OUTPUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "feed_forward.w2")


@dataclass
class RMUOptions:
    """Every knob of an RMU run (see the module docstring for the reasons behind the defaults); each field is
    also a `dsg rmu` option."""

    layer: int | None = option(None, help="the layer whose output is steered (default: round(7 * n_layers / 32))")
    update_layers: tuple[int, ...] | None = option(
        None, metavar="L", help="blocks whose weights train (default: layer-2..layer)"
    )
    update_params: tuple[str, ...] | None = option(
        None,
        metavar="NAME",
        help="modules inside a block whose weight trains (default: the MLP output projection, e.g. mlp.down_proj)",
    )
    steering_coeff: float | None = option(
        None, help="absolute c (default: --multiplier x mean forget activation norm)"
    )
    multiplier: float = option(3.0, help="c / mean forget activation norm")
    norm_rows: int = option(32, cli=False)  # forget rows used to measure the mean activation norm
    alpha: float = option(100.0, help="retain weight")
    lr: float = option(1e-3, help="AdamW learning rate")
    steps: int = option(60, help="optimisation steps")
    batch_size: int = option(4, help="forget rows and retain rows per step")
    seq_len: int = option(256, help=ROW_HELP["seq_len"])
    min_chars: int = option(50, help=ROW_HELP["min_chars"])
    max_docs: int | None = option(1024, help=ROW_HELP["max_docs"])
    packing: bool = option(True, help=ROW_HELP["packing"])
    seed: int = option(0, help=ROW_HELP["seed"])
    # move the model there first (run_rmu loads it there; None: "cpu")
    device: str | None = option(None, cli_default="cpu")

    def validate(self) -> None:
        """Refuse bad values before the model is loaded: one `DSGError`."""
        for flag in ("lr", "alpha", "multiplier", "steering_coeff"):
            value = getattr(self, flag)
            if value is not None and not math.isfinite(value):
                raise DSGError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
        raise_first(
            [
                (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
                (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
                row_option_checks(self, flags=False)[0],
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
                (self.multiplier > 0, f"multiplier must be > 0, got {self.multiplier}"),
                (
                    self.steering_coeff is None or self.steering_coeff > 0,
                    f"steering_coeff must be > 0, got {self.steering_coeff}",
                ),
                (self.norm_rows >= 1, f"norm_rows must be at least 1, got {self.norm_rows}"),
                row_option_checks(self, flags=False)[1],
            ]
        )


def default_layer(n_layers: int) -> int:
    """round(7 * n_layers / 32): the paper's depth ratio (layer 7 of zephyr-7b's 32)."""
    return min(n_layers - 1, int(7 * n_layers / 32 + 0.5))


# ------------------------------------------------------------------------------------ forward to l
def layer_hidden(model, layer: int, input_ids, attention_mask, params: dict | None = None):
    """The output of decoder block `layer` (the residual stream after it), [B, T, d].

    The forward stops right after that block. `params` (name -> tensor) replaces those parameters for
    this call only (`torch.func.functional_call`); gradients flow as in a normal forward.
    """
    from torch.func import functional_call

    from ..analysis.forward import block_output

    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if params:
        return block_output(model, layer, lambda: functional_call(model, params, args=(), kwargs=kwargs))
    return block_output(model, layer, lambda: model(**kwargs))


# ------------------------------------------------------------------------------------- parameters
def resolve_update_params(model, options: RMUOptions) -> tuple[int, list[int], dict]:
    """(layer, update_layers, {full parameter name: parameter}) for `options`; DSGError if out of range."""
    from ..analysis.forward import decoder_blocks

    blocks = decoder_blocks(model)
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

    from ..analysis.forward import decoder_blocks
    from ..analysis.stats import model_device

    options = options or RMUOptions()
    options.validate()
    start = time.perf_counter()
    if options.device:
        model.to(options.device)
    layer, update_layers, params = resolve_update_params(model, options)
    n_layers = len(decoder_blocks(model))
    forget = _rows(forget_texts, tokenizer, options, "forget")
    retain = _rows(retain_texts, tokenizer, options, "retain")
    device = model_device(model)

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
    options.validate()
    out_path = prepare_output(
        out, overwrite, inputs={"the --base model": base, "the --forget source": forget, "the --retain source": retain}
    )
    start = time.perf_counter()
    forget_texts, forget_specs = load_sources(forget, text_field)  # cheap inputs first
    retain_texts, retain_specs = load_sources(retain, text_field)
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
    p.add_argument("--base", required=True, metavar="MODEL", help="Hub id, local folder or .gguf file")
    add_corpora(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the unlearned model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_options(p, RMUOptions)


def options_from_args(args) -> RMUOptions:
    return from_args(RMUOptions, args)


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
