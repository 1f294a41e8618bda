"""`dsg train-sae`: train a sparse autoencoder on one decoder layer of a Hugging Face causal LM.

Training is sae-lens' own: its activation store, mixing buffer and trainer, driven by
`MultiSAETrainingRunner` (the single-SAE runner's multi-hook sibling; one SAE per layer, all fed from
one forward pass). The model is wrapped in `sae_lens.HookedProxyLM`, the hook is the decoder layer's
output (`model.layers.L`, the same point as TransformerLens `blocks.L.hook_resid_post`), and the data
set is passed pre-tokenized (`override_dataset`), so nothing is downloaded.

Speed: only layers `0..L` matter, so the runner gets a *truncated copy* of the model
(`truncate_model`: the same config with `num_hidden_layers = L + 1` and the first `L + 1` layers'
weights). The output of `layers[L]` is unchanged (checked in tests/test_train_sae.py), and sae-lens
additionally stops the forward at the hook.

Data: the texts are packed like the guard's statistics rows (`rows.build_rows(packing=True)`:
shuffled, joined with EOS, cut into `seq_len`-token rows that start with BOS). Position 0 (BOS, an
attention sink with an outlier norm, which the guard ignores) is not used for training
(`seqpos_slice=(1, None)`).
If the texts hold fewer tokens than `tokens`, the rows are repeated (epochs).

Defaults: TopK, k = 32, inputs rescaled to mean norm sqrt(d_in) during training
(`normalize_activations="expected_average_only_in"`, folded into the weights at the end), Adam,
lr 4e-4 constant with linear decay to lr/10 over the last 20% of steps, 4096 tokens per batch,
seq_len 128. Other architectures: `batchtopk` (k active features per token on average over a batch;
saved for inference as JumpReLU with learned thresholds, so a guard computes only its selected
features), `jumprelu`, `standard`, `gated` (sae-lens defaults for their sparsity coefficients). A feature
counts as dead for sae-lens' TopK auxiliary loss after `max(25, steps // 10)` steps without firing.

Speed options: `--bf16` runs the model forward and the SAE matmuls under bfloat16 autocast (weights,
Adam state and the saved SAE stay float32), which pays on CPUs with AVX512-BF16 or AMX. On a shared,
oversubscribed CPU, set `OMP_NUM_THREADS=1`: threads spinning at OpenMP barriers cost more than they
give (both measured in benchmarks/README.md). `--checkpoints N --checkpoint-dir DIR` keeps sae-lens training
checkpoints of a long run.

Output: a sae-lens folder (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`,
`runner_cfg.json`, plus `training_metrics.json`), written atomically; `SAE.load_from_disk(out)`
loads it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DSGError, raise_first
from ..options import add_options, from_args, option
from ..runtime.configuration_dsg import MAX_D_SAE

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard", "gated")
TOPK_FAMILY = ("topk", "batchtopk")  # k active features per token (batchtopk: on average over the batch)


# ----------------------------------------------------------------------------------------- model
def decoder_layers_path(model) -> str:
    """Dotted module path of the decoder-layer list (`model.layers`, `transformer.h`, ...), as the runtime's
    `decoder_layers_path` finds it; DSGError if there is none."""
    from ..runtime.modeling_dsg import decoder_layers_path as runtime_decoder_layers_path

    try:
        return runtime_decoder_layers_path(model)
    except ValueError:
        raise DSGError(f"cannot find the decoder layers of {type(model).__name__}") from None


def num_layers(model) -> int:
    return len(model.get_submodule(decoder_layers_path(model)))


def hook_name(model, layer: int) -> str:
    return f"{decoder_layers_path(model)}.{layer}"


def truncate_model(model, last_layer: int):
    """A copy of `model` with only decoder layers `0..last_layer` (shared weights are copied, not tied).

    The output of `layers[last_layer]` is the same as in the full model; the final norm and LM head
    are kept so the copy is still a normal `...ForCausalLM`.
    """
    from transformers import AutoModelForCausalLM

    n = num_layers(model)
    if not 0 <= last_layer < n:
        raise DSGError(f"layer {last_layer} is out of range: the model has layers 0..{n - 1}")
    config = copy.deepcopy(model.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(text, name) and isinstance(getattr(text, name), int):
            setattr(text, name, last_layer + 1)
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[: last_layer + 1]
    small = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    prefix = decoder_layers_path(model) + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix) and int(key[len(prefix) :].split(".", 1)[0]) > last_layer:
            continue
        state[key] = value
    small.load_state_dict(state, strict=True)
    return small.to(next(model.parameters()).device).eval()


@dataclass
class TrainSAEOptions:
    """How an SAE is trained; each field is also a `dsg train-sae` option."""

    width: int = option(4096, help="number of SAE features")
    architecture: str = option("topk", choices=ARCHITECTURES, help="the SAE architecture")
    k: int = option(32, help="active features per token for topk and batchtopk")
    tokens: int | None = option(None, help="training tokens (default: one pass over the texts)")
    seq_len: int = option(128, help="tokens per training row")
    lr: float = option(4e-4, help="Adam learning rate")
    batch_tokens: int = option(4096, help="tokens per training batch")
    device: str = option("cpu")
    seed: int = option(42, help="seed of the row order and the initialisation")
    autocast: bool = option(
        False,
        flag="--bf16",
        help="bfloat16 autocast for the model forward and the SAE matmuls (weights stay float32); "
        "faster on CPUs with AVX512-BF16 or AMX",
    )
    n_checkpoints: int = option(
        0, flag="--checkpoints", metavar="N", help="save N evenly spaced training checkpoints under --checkpoint-dir"
    )

    def validate(self) -> None:
        """Refuse bad training options before anything is loaded (each a `DSGError` naming the flag)."""
        width, k, lr = self.width, self.k, self.lr
        raise_first(
            [
                (
                    self.architecture in ARCHITECTURES,
                    f"unknown architecture {self.architecture!r} (choose from {', '.join(ARCHITECTURES)})",
                ),
                (1 <= width <= MAX_D_SAE, f"--width must be between 1 and {MAX_D_SAE}, got {width}"),
                (k >= 1, f"--k must be at least 1, got {k}"),
                (
                    self.architecture not in TOPK_FAMILY or k <= width,
                    f"--k {k} is more than the SAE has features (--width {width}): a TopK SAE keeps at most "
                    "--width features active",
                ),
                (
                    isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
                    f"--lr must be a finite number > 0, got {lr}",
                ),
                (self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}"),
                (self.batch_tokens >= 1, f"--batch-tokens must be at least 1, got {self.batch_tokens}"),
                (self.tokens is None or self.tokens >= 1, f"--tokens must be at least 1, got {self.tokens}"),
                (self.n_checkpoints >= 0, f"--checkpoints must be 0 or more, got {self.n_checkpoints}"),
            ]
        )


def training_options(width: int, options: TrainSAEOptions | None, fields: dict) -> TrainSAEOptions:
    """`options` (or the defaults) with `width` and the keyword `fields` a caller of `train_sae(s)` gave."""
    return dataclasses.replace(options or TrainSAEOptions(), width=width, **fields)


# ------------------------------------------------------------------------------------------ data
def pack_rows(texts, tokenizer, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Training rows: `rows.build_rows(packing=True)` over all texts (shuffled with `seed`, joined with
    EOS, cut into `seq_len`-token rows that start with BOS when the tokenizer has one)."""
    from ..data.rows import build_rows

    rows = build_rows(list(texts), tokenizer, seq_len=seq_len, min_chars=0, max_docs=None, packing=True, seed=seed)
    keep = rows.attention_mask.all(1)  # drop a lone, padded row
    if not keep.any():
        raise DSGError(f"the training texts hold fewer than seq-len={seq_len} tokens")
    return rows.input_ids[keep].tolist()


# -------------------------------------------------------------------------------------- training
def _sae_config(architecture: str, d_in: int, width: int, k: int):
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        GatedTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    common = dict(d_in=d_in, d_sae=width, normalize_activations="expected_average_only_in")
    if architecture == "topk":
        return TopKTrainingSAEConfig(k=k, **common)
    if architecture == "batchtopk":  # saved for inference as JumpReLU with the learned thresholds
        return BatchTopKTrainingSAEConfig(k=k, **common)
    if architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(**common)
    if architecture == "standard":
        return StandardTrainingSAEConfig(**common)
    if architecture == "gated":
        return GatedTrainingSAEConfig(**common)
    raise DSGError(f"unknown architecture {architecture!r} (choose from {', '.join(ARCHITECTURES)})")


def _add_progress(runner, n_batches: int, batch_tokens: int) -> None:
    """A per-batch tqdm bar (sae-lens' own bar moves only every 100 steps, minutes apart on a CPU)."""
    from tqdm.auto import tqdm

    store = runner.activations_store
    make_loader = store.get_multi_hook_data_loader

    def loader():
        with tqdm(total=n_batches * batch_tokens, desc="SAE training tokens", unit="tok", unit_scale=True) as bar:
            for batch in make_loader():
                bar.update(batch_tokens)
                yield batch

    store.get_multi_hook_data_loader = loader


def train_saes(
    model,
    tokenizer,
    texts,
    layers: list[int],
    width: int,
    *,
    options: TrainSAEOptions | None = None,
    model_name: str = "model",
    checkpoint_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike,
    **fields,
) -> dict[int, Path]:
    """Train one SAE per layer in `layers` from one (truncated) forward pass; returns {layer: folder}.

    The folders are sae-lens folders under `workdir/layer{L}`. The training options are `options` with
    `width` and any `TrainSAEOptions` field given as a keyword (`k=16`). `tokens` defaults to the number of
    training positions in the packed texts (one epoch). `autocast` runs the model's forward and the
    SAE's matmuls under bfloat16 autocast (weights, Adam state and the saved SAE stay float32).
    `n_checkpoints` > 0 saves that many evenly spaced sae-lens training checkpoints (weights, Adam
    and activation-scaler state) under `checkpoint_dir`, which a long run can be resumed from.
    """
    import torch
    from datasets import Dataset
    from sae_lens import LoggingConfig, MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
    from sae_lens.load_model import HookedProxyLM

    os.environ.setdefault("WANDB_MODE", "disabled")
    o = training_options(width, options, fields)
    architecture, k, tokens, seq_len, lr = o.architecture, o.k, o.tokens, o.seq_len, o.lr
    batch_tokens, device, seed, autocast, n_checkpoints = o.batch_tokens, o.device, o.seed, o.autocast, o.n_checkpoints
    layers = sorted(set(int(x) for x in layers))
    n = num_layers(model)
    for layer in layers:
        if not 0 <= layer < n:
            raise DSGError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
    if width <= 0 or k <= 0 or seq_len < 2 or batch_tokens <= 0:
        raise DSGError("width, k and batch-tokens must be positive and seq-len at least 2")
    o.validate()
    rows = pack_rows(texts, tokenizer, seq_len, seed=seed)
    per_row = seq_len - 1  # position 0 is skipped
    available = len(rows) * per_row
    tokens = available if tokens is None else int(tokens)
    if tokens < batch_tokens:
        raise DSGError(f"--tokens {tokens} is less than one batch ({batch_tokens} tokens)")
    torch.manual_seed(seed)

    small = truncate_model(model, layers[-1]).to(device)
    d_in = small.config.get_text_config().hidden_size
    hooks = {f"layer{L}": hook_name(small, L) for L in layers}
    proxy = HookedProxyLM(small, tokenizer, hook_names=list(hooks.values()))
    steps = tokens // batch_tokens
    store_prompts = max(1, min(32, batch_tokens // per_row))
    # sae-lens' mixing buffer holds n_batches_in_buffer * per_row positions: make it 8 training batches
    n_in_buffer = -(-8 * batch_tokens // per_row)
    cfg = MultiSAETrainingRunnerConfig(
        saes={name: _sae_config(architecture, d_in, width, k) for name in hooks},
        hook_names=hooks,
        model_name=model_name,
        model_class_name="AutoModelForCausalLM",
        dataset_path="(pre-tokenized texts)",
        streaming=False,
        context_size=seq_len,
        seqpos_slice=(1, None),
        prepend_bos=False,
        training_tokens=tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=store_prompts,
        n_batches_in_buffer=n_in_buffer,
        device=device,
        seed=seed,
        autocast=autocast,
        autocast_lm=autocast,
        lr=lr,
        lr_end=lr / 10,
        lr_decay_steps=steps // 5,
        dead_feature_window=max(25, steps // 10),
        feature_sampling_window=max(50, steps // 5),
        n_batches_for_norm_estimate=max(1, min(10, steps)),
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(checkpoint_dir) if checkpoint_dir and n_checkpoints > 0 else None,
        n_checkpoints=n_checkpoints if checkpoint_dir else 0,
        output_path=str(workdir),
    )
    dataset = Dataset.from_dict({"input_ids": rows})
    runner = MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=proxy)
    _add_progress(runner, steps + cfg.n_batches_for_norm_estimate, batch_tokens)
    runner.run()
    return {L: Path(workdir) / f"layer{L}" for L in layers}


def evaluate_sae(
    sae, model, tokenizer, texts, layer: int, *, seq_len: int = 128, max_tokens: int = 20000, batch_rows: int = 8
) -> dict:
    """Reconstruction metrics of a sae-lens `SAE` at `layers[layer]` on `texts` (packed rows, position 0 skipped).

    explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 ; l0 = mean number of
    active features per token; dead_fraction = features that never fire on these tokens;
    ce_loss / ce_loss_spliced / ce_delta: mean next-token loss of the full model without and with
    the SAE reconstruction replacing the output of `layers[layer]` (the metrics' own tokens).
    """
    import torch

    rows = pack_rows(texts, tokenizer, seq_len)[: max(1, max_tokens // seq_len)]
    ids = torch.tensor(rows)
    target = model.get_submodule(hook_name(model, layer))
    captured = {}

    def capture(_m, _i, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    def splice(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        rec = h.clone()
        rec[:, 1:] = sae.decode(sae.encode(h[:, 1:].float())).to(h.dtype)
        return (rec, *out[1:]) if isinstance(out, tuple) else rec

    sse = 0.0
    xs = []
    l0_sum, n_tok = 0.0, 0
    fired = None
    ce = ce_sp = 0.0
    n_ce = 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_rows):
            batch = ids[i : i + batch_rows]
            handle = target.register_forward_hook(capture)
            try:
                logits = model(batch).logits
            finally:
                handle.remove()
            x = captured["h"][:, 1:].reshape(-1, captured["h"].shape[-1]).float()
            f = sae.encode(x)
            x_hat = sae.decode(f)
            sse += ((x - x_hat) ** 2).sum().item()
            xs.append(x)
            active = f > 0
            l0_sum += active.sum().item()
            n_tok += x.shape[0]
            fired = active.any(0) if fired is None else fired | active.any(0)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            handle = target.register_forward_hook(splice)
            try:
                logits_sp = model(batch).logits
            finally:
                handle.remove()
            loss_sp = torch.nn.functional.cross_entropy(
                logits_sp[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            ce += loss.item()
            ce_sp += loss_sp.item()
            n_ce += batch[:, 1:].numel()
    allx = torch.cat(xs)
    sst = ((allx - allx.mean(0)) ** 2).sum().item()
    return {
        "eval_tokens": n_tok,
        "explained_variance": 1 - sse / sst,
        "l0": l0_sum / n_tok,
        "dead_fraction": 1 - fired.float().mean().item(),
        "ce_loss": ce / n_ce,
        "ce_loss_spliced": ce_sp / n_ce,
        "ce_delta": (ce_sp - ce) / n_ce,
    }


def train_sae(
    model,
    tokenizer,
    texts,
    layer: int,
    width: int,
    *,
    out,
    options: TrainSAEOptions | None = None,
    model_name: str = "model",
    overwrite: bool = False,
    checkpoint_dir=None,
    eval_texts=None,
    eval_tokens: int = 8192,
    **fields,
) -> dict:
    """Train one SAE on the output of decoder layer `layer` and save it (sae-lens format) to `out`.

    The training options are as for `train_saes`. Returns training metrics (tokens, wall time, sae-lens'
    final L0 / dead count) and, if
    `eval_texts` is given, `evaluate_sae` metrics on them; all are also written to
    `out/training_metrics.json`.
    """
    from sae_lens import SAE

    from ..outputs import prepare_output
    from ..paths import atomic_output_dir

    o = training_options(width, options, fields)
    n = num_layers(model)
    if not 0 <= layer < n:
        raise DSGError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
    out = prepare_output(out, overwrite, inputs={"the --checkpoint-dir folder": checkpoint_dir})
    start = time.time()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        work = Path(tmp) / "_work"
        folders = train_saes(
            model,
            tokenizer,
            texts,
            [layer],
            width,
            options=o,
            model_name=model_name,
            checkpoint_dir=checkpoint_dir,
            workdir=work,
        )
        for item in folders[layer].iterdir():
            item.rename(Path(tmp) / item.name)
        if (work / "runner_cfg.json").exists():
            (work / "runner_cfg.json").rename(Path(tmp) / "runner_cfg.json")
        for leftover in sorted(work.rglob("*"), reverse=True):
            leftover.rmdir() if leftover.is_dir() else leftover.unlink()
        work.rmdir()
        sae = SAE.load_from_disk(str(tmp))
        from ..data.sources import check_finite

        try:  # a diverged run (e.g. too high --lr) writes nothing
            check_finite(sae.state_dict().items(), "the trained SAE")
        except DSGError as err:
            raise DSGError(f"{err}: training diverged (lr {o.lr:g}); lower --lr. Nothing was written") from None
        meta = sae.cfg.metadata
        metrics = {
            "layer": layer,
            "hook_name": meta.hook_name,
            "architecture": sae.cfg.architecture(),
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "k": o.k if o.architecture in TOPK_FAMILY else None,
            "training_tokens": o.tokens
            if o.tokens is not None
            else len(pack_rows(texts, tokenizer, o.seq_len, o.seed)) * (o.seq_len - 1),
            "seq_len": o.seq_len,
            "lr": o.lr,
            "batch_tokens": o.batch_tokens,
            "bf16_autocast": o.autocast,
            "train_l0": getattr(meta, "l0", None),
            "train_dead_features": getattr(meta, "num_dead_features", None),
            "train_wall_s": round(time.time() - start, 1),
        }
        if eval_texts is not None:
            metrics.update(
                evaluate_sae(sae, model, tokenizer, eval_texts, layer, seq_len=o.seq_len, max_tokens=eval_tokens)
            )
        (Path(tmp) / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="model: local folder, .gguf file or Hub id")
    parser.add_argument("--layer", type=int, required=True, help="decoder layer whose output the SAE reads")
    parser.add_argument(
        "--text",
        nargs="+",
        required=True,
        metavar="SRC",
        help="training text sources: .txt, .jsonl, .parquet, a Hub data set NAME[:CONFIG][@SPLIT], or "
        "'embedded:sae' (the embedded default's SAE training text, build splits only)",
    )
    parser.add_argument("--out", required=True, help="output folder (sae-lens format)")
    parser.add_argument(
        "--eval-text",
        nargs="*",
        default=None,
        metavar="SRC",
        help="held-out text for the final metrics (explained variance, L0, CE increase); same sources as "
        "--text, plus 'embedded:heldout-wikitext'",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="folder for --checkpoints (kept after the run)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_options(parser, TrainSAEOptions)


def _texts(sources) -> list[str]:
    from ..data.sources import load_texts

    texts = []
    for src in sources:
        if src == "embedded:sae":
            from ..embedded.data import sae_training_texts

            texts.extend(sae_training_texts())
        elif src == "embedded:heldout-wikitext":
            from ..embedded.data import heldout_prompts

            texts.extend(heldout_prompts()["wikitext"])
        else:
            texts.extend(load_texts(src))
    return texts


def run(args) -> int:
    if args.n_checkpoints and not args.checkpoint_dir:
        raise DSGError("--checkpoints needs --checkpoint-dir")
    from ..outputs import prepare_output

    prepare_output(
        args.out,
        args.overwrite,
        inputs={
            "the --base model": args.base,
            "the --text source": args.text,
            "the --eval-text source": args.eval_text,
            "the --checkpoint-dir folder": args.checkpoint_dir,
        },
    )
    options = from_args(TrainSAEOptions, args)
    options.validate()
    texts = _texts(args.text)
    eval_texts = _texts(args.eval_text) if args.eval_text else None
    from ..data.sources import load_base_model

    model, tok = load_base_model(args.base, device=args.device)
    print(f"training a {args.architecture} SAE (width {args.width}) on layer {args.layer} of {args.base}", flush=True)
    metrics = train_sae(
        model,
        tok,
        texts,
        args.layer,
        options.width,
        out=args.out,
        options=options,
        model_name=str(args.base),
        overwrite=args.overwrite,
        checkpoint_dir=args.checkpoint_dir,
        eval_texts=eval_texts,
    )
    print(json.dumps(metrics, indent=2))
    print(f"saved {args.out}")
    return 0
