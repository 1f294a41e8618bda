"""DSGForCausalLM: any Hugging Face causal LM with Dynamic SAE Guardrails at its residual stream.

The base model is held unchanged (`self.model`, composition). Each guardrail is a `DSGGuard` module
(`self.guards[i]`) hooked onto the output of its decoder block; see `guard_dsg.py` for the math.

Promises (all tested):
- a row whose guardrails do not fire gets logits bit-identical to the base model's;
- a row's decision depends only on that row (padding-aware counts, no BOS), never on the batch;
- during `generate` with a KV cache the decision taken on the prompt carries through decoding and is
  updated as tokens arrive (running rho; once fired, a row stays fired); the running state lives on the
  cache object itself and follows its rows through beam search, batch selection and roll-backs;
- the same code runs on every transformers 5 release: the cache argument is accepted as `cache`
  (transformers >= 5.24) or `past_key_values` (earlier), and the base model gets the name its own
  `forward` takes;
- no per-call state on the module: concurrent calls from several threads are safe.

This file, `configuration_dsg.py`, `guard_dsg.py` and `sae_dsg.py` travel to the Hub with the weights;
they import only torch and transformers.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging

from .configuration_dsg import DSGConfig, validate_guardrail
from .guard_dsg import (
    CURRENT_CALL,
    GUARDS_DISABLED,
    RECORDS,
    DSGGuard,
    GuardCall,
    GuardDecision,
    GuardRecord,
    GuardState,
    RefusalState,
)

# Every decision, for operators: `TRANSFORMERS_VERBOSITY=info` (or `transformers.logging.set_verbosity_info()`)
# logs each row's decision on its prompt and the token at which a row fires later. Silent by default.
logger = logging.get_logger("transformers.dsg")

# Inside `generate`: where each forward leaves its decisions, for the output of `generate` to carry.
_GENERATE: contextvars.ContextVar = contextvars.ContextVar("dsg_generate", default=None)

_PACKED = (
    "DSG: packed inputs (continuous batching, `generate_batch`, or several sequences packed into one row) "
    "are not supported: the guardrails decide per row, so one request's text would switch the guard on or "
    "off for another. Use `generate` or a pipeline (one row per request); to serve, a server that calls "
    "`generate` per request (`dsg serve` in the modeling_dsg package)."
)

# Attribute paths tried from the model's decoder (`get_decoder()`), its base model and the model itself:
# Llama/Gemma/Qwen/Mistral (`layers`), GPT-2/GPT-J/Bloom/Falcon (`h`), MPT (`blocks`), GPT-NeoX, OPT
# (`decoder.layers`), multimodal models with a text model inside (`language_model.layers`), ...
LAYER_PATHS = (
    "layers",
    "h",
    "blocks",
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "decoder.layers",
    "model.model.layers",
    "model.transformer.h",
    "model.language_model.layers",
    "model.decoder.layers",
)


def decoder_layers_path(model: nn.Module) -> str:
    """The dotted name, within `model`, of its decoder blocks (a non-empty ModuleList): `model.layers`,
    `transformer.h`, ... as `model.get_submodule` and hook names take it. The first of `LAYER_PATHS` that
    leads to one, tried from `model.get_decoder()`, then `model.base_model`, then `model`; ValueError if none.
    """
    roots = []
    if hasattr(model, "get_decoder"):
        try:
            roots.append(model.get_decoder())
        except Exception:  # some models raise here; the other roots still apply
            pass
    roots += [getattr(model, "base_model", None), model]
    names = None
    for root in roots:
        for path in LAYER_PATHS:
            obj = root
            for name in path.split("."):
                obj = getattr(obj, name, None)
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                if root is model:
                    return path
                if names is None:  # where the root sits inside `model`
                    names = {id(module): name for name, module in model.named_modules()}
                if id(obj) in names:
                    return names[id(obj)]
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(LAYER_PATHS)})")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM, as a ModuleList (see `decoder_layers_path`)."""
    return model.get_submodule(decoder_layers_path(model))


def cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` since transformers 5.24,
    `past_key_values` before. Read from the signature, so it holds for any release and any model."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class GuardedCache:
    """Mixed into the class of a KV cache that a DSG model uses, so the guardrails' running state (a
    `GuardState` of per-row tensors per guardrail, and the `RefusalState`) lives on the cache and follows
    whatever `generate` does to the cache's rows:

    - `reorder_cache` (beam search) and `batch_select_indices` pick the same rows of the state;
    - `batch_repeat_interleave` repeats them;
    - `crop` that undoes the last forward call restores the state from before that call; a crop that
      cuts into a call the guardrails already judged (assisted or speculative decoding) raises, since
      the decisions taken on the removed tokens cannot be taken back;
    - `reset` clears it.
    """

    def _dsg_start(self):
        self._dsg_state, self._dsg_tokens, self._dsg_previous = {}, 0, None

    def _dsg_advance(self, state: dict, tokens: int):
        """Record the state after a forward call over `tokens` more positions."""
        self._dsg_previous = (self._dsg_state, self._dsg_tokens)  # never changed in place: each call makes its own
        self._dsg_state, self._dsg_tokens = state, self._dsg_tokens + tokens

    def _dsg_rows(self, pick):
        self._dsg_state = {i: type(s)._make(pick(t) for t in s) for i, s in self._dsg_state.items()}
        self._dsg_previous = None  # a row change ends what can be rolled back

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._dsg_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._dsg_rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._dsg_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int):
        # negative: remove that many; positive (older releases): the length to keep
        removed = -tokens_to_remove if tokens_to_remove <= 0 else self._dsg_tokens - tokens_to_remove
        if removed > 0:
            previous = self._dsg_previous
            if previous is None or self._dsg_tokens - removed != previous[1]:
                raise ValueError(
                    f"DSG: the KV cache is being cut back by {removed} token(s) inside a forward call the "
                    "guardrails already judged (assisted or speculative decoding, prompt lookup). Their "
                    "decisions cannot be taken back there; generate without an assistant model or "
                    "prompt_lookup_num_tokens."
                )
            (self._dsg_state, self._dsg_tokens), self._dsg_previous = previous, None
        super().crop(tokens_to_remove)

    def reset(self):
        super().reset()
        self._dsg_start()


_GUARDED_CLASSES: dict = {}


def guarded_cache(cache):
    """Give `cache` (any transformers `Cache`) the guardrails' running state, once; returns it."""
    if not isinstance(cache, GuardedCache):
        base = type(cache)
        if base not in _GUARDED_CLASSES:  # same name, so reprs and name-based checks see the cache's own
            _GUARDED_CLASSES[base] = type(base.__name__, (GuardedCache, base), {"__module__": base.__module__})
        try:
            cache.__class__ = _GUARDED_CLASSES[base]
        except TypeError as error:
            raise ValueError(f"DSG: cannot carry the guardrails' state on a {base.__name__}: {error}") from None
        cache._dsg_start()
    return cache


class DSGPreTrainedModel(PreTrainedModel):
    config_class = DSGConfig
    base_model_prefix = "dsg"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _keep_in_fp32_modules_strict = ["guards"]
    _no_split_modules = ["DSGGuard"]

    def _init_weights(self, module):
        if isinstance(module, DSGGuard):
            for tensor in module.sae.parameters():
                init.zeros_(tensor)
            init.copy_(module.feature_index, torch.tensor(module.features, dtype=torch.long))
            mask = torch.zeros(module.feature_mask.shape, dtype=torch.bool)
            mask[module.features] = True
            init.copy_(module.feature_mask, mask)
            init.copy_(module.tau, torch.tensor(module.threshold, dtype=module.tau.dtype))
            if hasattr(module.sae, "dec_norm"):
                init.ones_(module.sae.dec_norm)
        elif module is not self:
            super()._init_weights(module)


class DSGForCausalLM(DSGPreTrainedModel, GenerationMixin):
    """A causal LM with SAE guardrails. Build it from a config, or wrap a live model with `base_model`."""

    _auto_class = "AutoModelForCausalLM"  # save_pretrained writes auto_map and copies the code files

    def __init__(self, config: DSGConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("DSG config: text_config is missing")
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            for module in base_model.modules():  # already trained: post_init must not touch it
                module._is_hf_initialized = True
        self.model = base_model
        self._cache_argument = cache_argument(base_model)
        self.guards = nn.ModuleList(DSGGuard(g, i) for i, g in enumerate(config.guardrails))
        self.post_init()
        self._guard_hooks = []
        for guard in self.guards:
            self._hook(guard)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then refuse checkpoints with missing, NaN or inconsistent
        guardrail tensors (the base class would silently initialise a missing tensor)."""
        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        for kind in ("missing", "unexpected"):  # a DSG folder is complete: nothing initialised at random,
            keys = sorted(info.get(f"{kind}_keys", ()))  # nothing stored that the config does not describe
            if keys:
                what = "guardrail" if all(k.startswith("guards.") for k in keys) else "model"
                shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
                raise ValueError(
                    f"DSG checkpoint: {kind} {what} tensor(s) {shown} (the weights do not match config.json)"
                )
        mismatched = [m if isinstance(m, tuple) else (m,) for m in info.get("mismatched_keys", ())]
        refused = [m for m in mismatched if not ignore_mismatched or str(m[0]).startswith("guards.")]
        if refused:
            described = "; ".join(
                f"{m[0]} has shape {tuple(m[1])}, expected {tuple(m[2])}" if len(m) == 3 else str(m[0])
                for m in refused
            )
            raise ValueError(f"DSG checkpoint: tensor(s) with the wrong shape: {described}")
        for guard in model.guards:
            guard.check_loaded()
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, slim: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`; with `slim=True` the SAEs are stored as the selected
        features' slices only (the loaded model then computes exactly the same outputs)."""
        if not slim or all(guard.sae.slim for guard in self.guards):
            return super().save_pretrained(save_directory, *args, **kwargs)
        full_guards, full_config = self.guards, self.config.guardrails
        self.guards = nn.ModuleList(guard.slimmed() for guard in full_guards)
        self.config.guardrails = [guard.guardrail_config() for guard in self.guards]
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.guards, self.config.guardrails = full_guards, full_config

    def guard(self, which: int | str) -> DSGGuard:
        """A guardrail by index or name."""
        for i, guard in enumerate(self.guards):
            if which == i or which == guard.name:
                return guard
        raise KeyError(f"no guardrail {which!r} (have {[g.name for g in self.guards]})")

    @torch.no_grad()
    def set_threshold(self, which: int | str, tau: float):
        """Change a guardrail's threshold tau (config, module and saved buffer together)."""
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {tau}")
        guard = self.guard(which)
        guard.threshold = float(tau)
        guard.tau.fill_(float(tau))
        self.config.guardrails[guard.index] = {**self.config.guardrails[guard.index], "threshold": float(tau)}

    def _hook(self, guard: DSGGuard):
        layers = decoder_layers(self.model)
        self._guard_hooks.append(layers[guard.layer].register_forward_hook(guard.hook))

    def add_guardrail(self, guardrail: dict, sae_state_dict: dict | None = None) -> DSGGuard:
        """Append a guardrail (sequential unlearning): the existing ones are not touched."""
        text = self.config.get_text_config()
        g = validate_guardrail(guardrail, len(self.guards), text.num_hidden_layers, text.hidden_size)
        if g["name"] in {x.name for x in self.guards}:
            raise ValueError(f"DSG config: a guardrail named {g['name']!r} already exists")
        guard = DSGGuard(g, len(self.guards))
        if sae_state_dict is not None:
            guard.sae.load_state_dict(sae_state_dict, strict=True)
            guard.check_loaded()
        device = next(self.model.parameters()).device
        self.guards.append(guard.to(device))
        self.config.guardrails = [*self.config.guardrails, g]
        self._hook(guard)
        return guard

    def remove_guardrail(self, which: int | str) -> DSGGuard:
        """Detach a guardrail (by name or index) and return it; the others keep their settings.
        A KV cache made before the removal must not be continued after it."""
        guard = self.guard(which)
        position = guard.index
        for handle in self._guard_hooks:
            handle.remove()
        del self.guards[position]
        self.config.guardrails = [g for i, g in enumerate(self.config.guardrails) if i != position]
        self._guard_hooks = []
        for i, kept in enumerate(self.guards):
            kept.index = i
            self._hook(kept)
        return guard

    # -- the per-call context ------------------------------------------------------------------------
    @contextlib.contextmanager
    def guardrails_disabled(self):
        """Run the base model through this instance: inside the block no guardrail acts (this thread only)."""
        token = GUARDS_DISABLED.set(True)
        try:
            yield
        finally:
            GUARDS_DISABLED.reset(token)

    @contextlib.contextmanager
    def record_guardrails(self):
        """Collect, for every forward inside the block, each guardrail's rho, decision, token flags and
        selected-feature activations: a list of `GuardRecord`s (read as dicts too), one per guardrail and
        forward."""
        records: list[GuardRecord] = []
        token = RECORDS.set(records)
        try:
            yield records
        finally:
            RECORDS.reset(token)

    def _counted_tokens(self, input_ids, attention_mask, batch, length, device, first_chunk):
        """[B, T] bool: the tokens of this call that count (not padding, not BOS), in few tensor operations (a
        decoding step runs this once)."""
        if attention_mask is not None and attention_mask.dim() == 2:
            counted = attention_mask[:, -length:]
            if counted.device != device:
                counted = counted.to(device)
            if first_chunk:
                empty = ~counted.bool().any(-1)
                if empty.any():
                    raise ValueError(f"DSG: input row {int(empty.nonzero()[0])} is all padding (no real token)")
        else:
            counted = torch.ones(batch, length, dtype=torch.bool, device=device)
        bos = self.config.text_config.bos_token_id
        if input_ids is None or bos is None:
            return counted if counted.dtype == torch.bool else counted != 0
        if input_ids.device != device:
            input_ids = input_ids.to(device)
        for token in bos if isinstance(bos, (list, tuple)) else [bos]:
            counted = torch.logical_and(counted, input_ids != token)  # a bool result, whatever the mask's dtype
        return counted

    # -- forward ---------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.model.set_output_embeddings(value)

    def get_decoder(self):
        return self.model.get_decoder()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        """The base model's forward with the guardrails acting at their layers. The KV cache may be passed
        as `cache` or `past_key_values` (both names work on every transformers release)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("DSG: pass the KV cache once, as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if "cu_seq_lens_q" in kwargs or "logits_indices" in kwargs or type(cache).__name__ == "PagedAttentionCache":
            raise ValueError(_PACKED)
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("DSG: pass input_ids or inputs_embeds")
        batch, length = tokens.shape[:2]
        if length == 0 or batch == 0:
            raise ValueError("DSG: empty input (zero-length sequence)")
        if use_cache is None:
            use_cache = getattr(self.config.get_text_config(), "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.get_text_config())
        if cache is not None:
            cache = guarded_cache(cache)  # the running state travels with the cache generate actually uses
        first = cache is None or cache._dsg_tokens == 0
        previous = {} if first else cache._dsg_state
        state = dict(previous)
        counted = self._counted_tokens(input_ids, attention_mask, batch, length, tokens.device, first)
        call = GuardCall(counted, state)
        token = CURRENT_CALL.set(call)
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{self._cache_argument: cache},
                **kwargs,
            )
        finally:
            CURRENT_CALL.reset(token)
        # only the guardrails that ran in this call act and report (none inside `guardrails_disabled`, even
        # on a cache whose earlier calls were guarded)
        refusing = [g for g in self.guards if g.action == "refuse" and g.index in call.rho]
        if refusing and getattr(out, "logits", None) is not None:
            out.logits = self._refuse(out.logits, state, refusing)
        if cache is not None:
            cache._dsg_advance(state, length)
        if logger.isEnabledFor(logging.INFO):
            self._log_decisions(call, previous, length if cache is None else cache._dsg_tokens)
        # every guardrail's decision per row, after this call (running rho; fired is sticky)
        out.guardrail_decisions = {
            g.name: GuardDecision(fired=state[g.index].fired, rho=call.rho[g.index], action=g.action)
            for g in self.guards
            if g.index in call.rho
        }
        trace = _GENERATE.get()
        if trace is not None:
            trace["decisions"] = out.guardrail_decisions
        return out

    # `generate` reads this signature on every decoding step of a model with its own code; made once, it is a lookup
    forward.__signature__ = inspect.signature(forward)

    def generate_batch(self, *args, **kwargs):
        """Continuous batching packs requests into one row: refused (see `_PACKED`)."""
        raise ValueError(_PACKED)

    def init_continuous_batching(self, *args, **kwargs):
        """Continuous batching packs requests into one row: refused (see `_PACKED`)."""
        raise ValueError(_PACKED)

    def _log_decisions(self, call, previous, position):
        """Log each row's decision when first taken, and the token at which a row fires after that."""
        for guard in self.guards:
            if guard.index not in call.rho:
                continue
            fired = call.state[guard.index].fired.tolist()
            before = previous[guard.index].fired.tolist() if guard.index in previous else None
            for row, (now, rho) in enumerate(zip(fired, call.rho[guard.index].tolist())):
                if before is None or (now and not before[row]):
                    logger.info(
                        "DSG guardrail %r (%s) row %d: rho %.4f, tau %.4f -> %s after %d tokens",
                        guard.name,
                        guard.action,
                        row,
                        rho,
                        guard.threshold,
                        "FIRED" if now else "not fired",
                        position,
                    )

    def _eos_token_id(self) -> int:
        eos = getattr(self.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.config.get_text_config().eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if not isinstance(eos, int):
            raise ValueError("DSG: the 'refuse' action needs the model's eos_token_id to end the refusal")
        return eos

    def _refuse(self, logits, state, guards):
        """Set the logits of rows that a refusing guardrail fired on so that the next token is the next one
        of the refusal (the first refusing guardrail's), then end of sequence. How much of the refusal a
        row has written is part of the running state (`state["refusal"]`, a `RefusalState`), so it follows
        the cache's rows."""
        batch = logits.shape[0]
        fired = torch.stack([state[g.index].fired.to(logits.device) for g in guards])  # [G, B]
        refusal = state.get("refusal")
        if refusal is None:
            refusal = RefusalState(written=torch.full((batch,), -1, dtype=torch.long))
        previous = refusal.written.to(logits.device)
        rows = fired.any(0)
        if not bool(rows.any()):
            state["refusal"] = RefusalState(written=previous)
            return logits
        eos = self._eos_token_id()
        longest = max(len(g.refusal_ids) for g in guards)
        table = torch.tensor(
            [g.refusal_ids + [eos] * (longest + 1 - len(g.refusal_ids)) for g in guards], device=logits.device
        )  # [G, longest + 1]: the refusal, then end of sequence
        which = fired.int().argmax(0)  # the first refusing guardrail that fired, per row
        written = previous.clamp(min=0)
        next_token = table[which, written.clamp(max=longest)]
        forced = torch.full_like(logits[rows], torch.finfo(logits.dtype).min)
        forced.scatter_(-1, next_token[rows].view(-1, 1, 1).expand(-1, logits.shape[1], 1), 0.0)
        logits = logits.clone() if logits.requires_grad else logits
        logits[rows] = forced
        state["refusal"] = RefusalState(written=torch.where(rows, written + 1, previous))
        return logits

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, refusing the modes whose roll-backs the guardrails cannot follow. With
        `return_dict_in_generate=True` the output carries `guardrail_decisions`: each guardrail's `fired`
        (at any point of the generation) and running `rho` per row of the last forward call (for beam
        search: the running beams)."""
        config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        if use_cache is False and any(g.action == "refuse" for g in self.guards):
            raise ValueError(
                "DSG: the 'refuse' action needs the KV cache (it keeps how much of the refusal "
                "each row has written); generate with use_cache=True"
            )
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(name) is not None or getattr(config, name, None) is not None:
                raise ValueError(
                    f"DSG: `{name}` (assisted or speculative decoding) is not supported: the "
                    "guardrails' decisions on rejected draft tokens cannot be taken back. "
                    "Generate without it."
                )
        trace: dict = {}
        token = _GENERATE.set(trace)
        try:
            result = super().generate(*args, **kwargs)
        finally:
            _GENERATE.reset(token)
        if hasattr(result, "sequences") and "decisions" in trace:
            result.guardrail_decisions = trace["decisions"]
        return result


__all__ = [
    "LAYER_PATHS",
    "DSGForCausalLM",
    "DSGPreTrainedModel",
    "GuardDecision",
    "GuardRecord",
    "GuardState",
    "GuardedCache",
    "RefusalState",
    "cache_argument",
    "decoder_layers",
    "decoder_layers_path",
    "guarded_cache",
]
