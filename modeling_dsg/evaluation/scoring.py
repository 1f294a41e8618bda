"""Scoring multiple-choice questions and texts with a model: the forwards behind `dsg eval` and `dsg sweep`.

Forwards
    `batched_forward` runs token sequences in batches, longest first, left padded (`padding_id`), with
    position ids that follow the attention mask, and keeps only the last positions' logits; with `record`
    it also yields each guardrail's decision per row, which `Decisions` collects. `as_base(model)` is the
    base model: a DSG model's guardrails off, any other model as it is.

Several processes (`dsg eval` under torchrun; `modeling_dsg.distributed`, W processes)
    `batched_forward` runs this process's batches only: r, r + W, r + 2W, ... of the longest-first order.
    Each consumer fills its per-row arrays from those inside `with all_rows(decisions, *arrays, what=...)`,
    which at its end gathers every process's rows of the arrays and of the `Decisions` (never logits), so every
    process returns the whole arrays, equal to one process's: each batch has the same rows and padding.

Scores (formulas in the `evaluate.py` docstring; prompts from `data.mcq`)
    `letter_logprobs`        log P(prefix + letter | prompt) for A..D (`letter_sequences`: the token sequences)
    `continuation_logprobs`  summed log P(continuation | context) (`cloze_sequences`, lm-eval-harness' pairs)
    `target_logprobs`        summed log P of given target tokens after given sequences (both of the above)
    `text_nll`               per text, summed NLL of its tokens and their count
    `mcq_texts` / `score_mcq`  the texts scored for a question set, and every score of one model on it
    `known_questions`        the known filter on the base model (`metrics.known_filter`)

Metrics
    `load_scorer` gives the `evaluate` module `dsg_unlearning` (`METRIC_DIR`, loaded offline with
    `evaluate.load`), or `DirectScorer` where it is not installed; both compute
    `metrics.compute_choice_metrics`. `mcq_metrics` puts one model's scores of a set through the scorer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from .. import distributed
from ..data.mcq import LETTERS, McqSet, answer_prefix, chat_wrap, cloze_context, letter_prompt
from ..errors import DSGError
from ..paths import PACKAGE_DIR, SHIPPED

if TYPE_CHECKING:
    from .evaluate import EvalOptions

METRIC_DIR = PACKAGE_DIR / SHIPPED["metric"]


# ------------------------------------------------------------------------------------- forwards
def model_device(model):
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def padding_id(tokenizer) -> int:
    """The token id padding is filled with: the pad token, else the end-of-sequence token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


@contextlib.contextmanager
def as_base(model):
    """The base model: a DSG model's guardrails off; any other model as it is."""
    if hasattr(model, "guardrails_disabled"):
        with model.guardrails_disabled():
            yield
    else:
        yield


def _encode_pairs(tokenizer, contexts: list[str], continuations: list[str], add_special: bool, ctx=None):
    """lm-eval-harness pair encoding: tokenize context + continuation together and cut after the
    context's tokens; if that cut does not fall on a token boundary, the continuation is tokenized
    on its own instead. Returns (context ids, continuation ids) lists (`ctx`: the contexts' ids, if known)."""
    if ctx is None:
        ctx = tokenizer(contexts, add_special_tokens=add_special)["input_ids"]
    whole = tokenizer([c + x for c, x in zip(contexts, continuations)], add_special_tokens=add_special)["input_ids"]
    conts = []
    for c, w, x in zip(ctx, whole, continuations):
        if w[: len(c)] == c and len(w) > len(c):
            conts.append(list(w[len(c) :]))
        else:
            conts.append(list(tokenizer(x, add_special_tokens=False)["input_ids"]))
    return [list(c) for c in ctx], conts


def batched_forward(
    model,
    sequences: list,
    n_keep: list,
    *,
    pad_id: int,
    batch_size: int,
    desc: str,
    record: bool = False,
    progress: bool = True,
):
    """Batched forwards over token sequences, longest first, left padded (position ids follow the
    attention mask, so a row's result does not depend on its padding). Yields (row indices, logits of
    the last K positions [B, K, V] in float32, {guardrail: (rho [B], fired [B])} if `record`).

    Over several processes only this process's batches (`distributed.shard`): the consumer gathers its
    per-row results with `all_rows`. Only the main process shows a progress bar."""
    import torch
    from tqdm.auto import tqdm

    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = distributed.shard(order[start : start + batch_size] for start in range(0, len(order), batch_size))
    shown = progress and distributed.is_main()
    for index in tqdm(batches, desc=desc, unit="batch", disable=not shown, leave=False):
        length = max(len(sequences[i]) for i in index)
        ids = torch.full((len(index), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), length), dtype=torch.long)
        for b, i in enumerate(index):
            seq = sequences[i]
            ids[b, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[b, length - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(n_keep[i] for i in index)
        recorder = (
            model.record_guardrails() if record and hasattr(model, "record_guardrails") else contextlib.nullcontext([])
        )
        with torch.no_grad(), recorder as records:
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                logits_to_keep=keep,
            )
        logits = out.logits[:, -keep:, :].float().cpu()
        decisions = {r["guardrail"]: (r["rho"].detach().double().cpu(), r["fired"].detach().cpu()) for r in records}
        yield index, logits, decisions


class Decisions:
    """Per-row rho and fired of every guardrail, filled batch by batch (from `batched_forward`'s decisions).

    `add` must see every batch: it also keeps the rows this process filled (`rows`), which `all_rows` gathers."""

    def __init__(self, n: int):
        self.n = n
        self.rho: dict = {}
        self.fired: dict = {}
        self.rows: list = []

    def add(self, index, decisions: dict):
        self.rows.extend(index)
        self._fill(index, decisions)

    def _fill(self, index, decisions: dict):
        import numpy as np

        for name, (rho, fired) in decisions.items():
            if name not in self.rho:
                self.rho[name] = np.full(self.n, np.nan)
                self.fired[name] = np.zeros(self.n, dtype=bool)
            self.rho[name][index] = np.asarray(rho)
            self.fired[name][index] = np.asarray(fired)

    def as_dict(self) -> dict:
        return {name: {"rho": self.rho[name], "fired": self.fired[name]} for name in self.rho}


@contextlib.contextmanager
def all_rows(decisions: Decisions, *arrays, what: str):
    """Around a consumer's loop over `batched_forward` (which calls `decisions.add` for every batch): at its end
    `arrays` (numpy, one entry per sequence along the first axis) and `decisions` hold every process's rows,
    not only those of this process's batches, in place. With one process it does nothing.

    A failure in the loop in any process fails it in every process (`distributed.raise_if_any_failed`, naming
    `what`), so none waits for rows that will not come.
    """
    import numpy as np

    if distributed.world_size() == 1:
        yield decisions
        return
    error = None
    try:
        yield decisions
    except Exception as err:  # every process learns of it (a lone failure would leave the others waiting)
        error = err
    distributed.raise_if_any_failed(error, what)
    rows = np.asarray(decisions.rows, dtype=np.int64)
    mine = (
        rows,
        [np.asarray(a)[rows] for a in arrays],
        {name: (decisions.rho[name][rows], decisions.fired[name][rows]) for name in decisions.rho},
    )
    gathered = distributed.all_gather_object(mine)
    decisions.rho, decisions.fired = {}, {}  # refilled from every process's rows, process 0's first (batch 0)
    for theirs, values, recorded in gathered:
        for array, value in zip(arrays, values):
            array[theirs] = value
        decisions._fill(theirs, recorded)


# ------------------------------------------------------------------------------------- scores
def letter_sequences(tokenizer, prompts: list[str], *, chat: bool = False, letters: str = LETTERS):
    """The token sequences that letter scoring feeds the model: (sequences, shared prefix ids, letter ids [n, 4]).
    Each sequence is the prompt plus the tokens the four answers share; the next token is the letter."""
    import numpy as np

    n = len(prompts)
    prefix = answer_prefix(chat)
    add_special = not chat
    shared, letter_ids, sequences = [], np.zeros((n, len(letters)), dtype=np.int64), []
    ctx_ids = tokenizer(prompts, add_special_tokens=add_special)["input_ids"]
    per_letter = [_encode_pairs(tokenizer, prompts, [prefix + L] * n, add_special, ctx_ids) for L in letters]
    for i in range(n):
        ctx = per_letter[0][0][i]
        conts = [per_letter[j][1][i] for j in range(len(letters))]
        ok = (
            len({len(c) for c in conts}) == 1
            and all(c[:-1] == conts[0][:-1] for c in conts)
            and len({c[-1] for c in conts}) == len(letters)
        )
        if not ok:
            shown = ", ".join(repr(prefix + L) for L in letters)
            raise DSGError(
                f"the answer letters {shown} are not single tokens after the prompt with this tokenizer "
                f"(prompt {i + 1} gives {conts}); letter scoring needs one token per letter"
            )
        shared.append(conts[0][:-1])
        letter_ids[i] = [c[-1] for c in conts]
        sequences.append(ctx + conts[0][:-1])
    return sequences, shared, letter_ids


def letter_logprobs(
    model,
    tokenizer,
    prompts: list[str],
    *,
    chat: bool = False,
    batch_size: int = 8,
    record: bool = False,
    desc: str = "letters",
    progress: bool = True,
    letters: str = LETTERS,
):
    """Letter scores [n, 4]: log P(prefix + letter | prompt) over the full vocabulary (prefix " ", or ""
    with `chat`; `prompts` are already chat-wrapped when `chat`), and, with `record`, each guardrail's
    {"rho", "fired"} per prompt. One forward per batch of prompts; only the last positions' logits are kept.
    """
    import numpy as np
    import torch

    n = len(prompts)
    sequences, shared, letter_ids = letter_sequences(tokenizer, prompts, chat=chat, letters=letters)
    n_keep = [len(s) + 1 for s in shared]
    scores = np.zeros((n, len(letters)))
    decisions = Decisions(n)
    with all_rows(decisions, scores, what=desc):
        for index, logits, dec in batched_forward(
            model,
            sequences,
            n_keep,
            pad_id=padding_id(tokenizer),
            batch_size=batch_size,
            desc=desc,
            record=record,
            progress=progress,
        ):
            logp = torch.log_softmax(logits, dim=-1)
            K = logp.shape[1]
            for b, i in enumerate(index):
                m = n_keep[i]
                rows = logp[b, K - m :]
                lead = sum(float(rows[s, t]) for s, t in enumerate(shared[i]))
                scores[i] = rows[-1, torch.as_tensor(letter_ids[i])].double().numpy() + lead
            decisions.add(index, dec)
    return scores, decisions.as_dict()


def target_logprobs(
    model,
    tokenizer,
    sequences: list,
    targets: list,
    *,
    batch_size: int = 8,
    record: bool = False,
    desc: str = "log-likelihood",
    progress: bool = True,
):
    """Summed log P of `targets[i]`, the tokens that the last len(targets[i]) positions of `sequences[i]`
    predict, and their count; plus the guardrails' decisions with `record`. Returns (sums [n], counts [n],
    decisions)."""
    import numpy as np
    import torch

    n = len(sequences)
    sums, counts = np.zeros(n), np.array([len(t) for t in targets], dtype=np.int64)
    decisions = Decisions(n)
    n_keep = [max(1, len(t)) for t in targets]
    with all_rows(decisions, sums, what=desc):
        for index, logits, dec in batched_forward(
            model,
            sequences,
            n_keep,
            pad_id=padding_id(tokenizer),
            batch_size=batch_size,
            desc=desc,
            record=record,
            progress=progress,
        ):
            K = logits.shape[1]
            for b, i in enumerate(index):
                t = targets[i]
                if not t:
                    continue
                rows = logits[b, K - len(t) :]
                picked = rows.gather(-1, torch.as_tensor(t).unsqueeze(-1)).squeeze(-1)
                sums[i] = float((picked - torch.logsumexp(rows, dim=-1)).double().sum())
            decisions.add(index, dec)
    return sums, counts, decisions.as_dict()


def cloze_sequences(tokenizer, contexts: list[str], continuations: list[str], *, chat: bool = False):
    """(model inputs (context + continuation)[:-1], continuation ids), as lm-eval-harness forms them."""
    ctx, conts = _encode_pairs(tokenizer, contexts, continuations, not chat)
    return [(c + x)[:-1] for c, x in zip(ctx, conts)], conts


def continuation_logprobs(
    model,
    tokenizer,
    contexts: list[str],
    continuations: list[str],
    *,
    chat: bool = False,
    batch_size: int = 8,
    record: bool = False,
    desc: str = "cloze",
    progress: bool = True,
):
    """Summed log P(continuation | context) and the continuation's token count, per pair (the input is
    (context + continuation)[:-1], as in lm-eval-harness)."""
    sequences, conts = cloze_sequences(tokenizer, contexts, continuations, chat=chat)
    return target_logprobs(
        model, tokenizer, sequences, conts, batch_size=batch_size, record=record, desc=desc, progress=progress
    )


def text_nll(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_tokens: int = 512,
    batch_size: int = 8,
    record: bool = False,
    desc: str = "text",
    progress: bool = True,
):
    """Per text: the summed NLL of tokens 2..T (T <= max_tokens, the tokenizer's special tokens included)
    and T - 1, plus the guardrails' decisions on the text with `record`."""
    ids = [list(x)[:max_tokens] for x in tokenizer(texts)["input_ids"]]
    sums, counts, decisions = target_logprobs(
        model,
        tokenizer,
        [x[:-1] or x for x in ids],
        [x[1:] for x in ids],
        batch_size=batch_size,
        record=record,
        desc=desc,
        progress=progress,
    )
    return -sums, counts, decisions


# ------------------------------------------------------------------------------- question sets
def mcq_texts(tokenizer, mcq: McqSet, options: EvalOptions) -> dict:
    """The texts scored for a question set: {"letter": prompts [n]} plus, unless `options.cloze` is
    "none", {"cloze": (contexts, continuations)}, 4 pairs per question with "all", 1 with "correct"."""
    recs = mcq.records
    wrap = (lambda text: chat_wrap(tokenizer, text)) if options.chat else (lambda text: text)
    out = {"letter": [wrap(letter_prompt(r, preamble=options.preamble, topic=mcq.name)) for r in recs]}
    if options.cloze != "none":
        prefix = answer_prefix(options.chat)
        every = options.cloze == "all"
        contexts = [wrap(cloze_context(r, preamble=options.preamble, topic=mcq.name)) for r in recs]
        if every:
            contexts = [c for c in contexts for _ in range(4)]
        continuations = [prefix + c for r in recs for c in (r["choices"] if every else [r["choices"][r["answer"]]])]
        out["cloze"] = (contexts, continuations)
    return out


def score_mcq(model, tokenizer, mcq: McqSet, options: EvalOptions, *, record: bool = False, tag: str = "") -> dict:
    """One model variant on one question set: {"letter": [n, 4] letter scores, "decisions": per guardrail
    rho/fired (with `record`)}, plus with `options.cloze` "all": "cloze" and "cloze_tokens" [n, 4] (each
    choice's summed log-likelihood and token count), with "correct": "cloze_correct" and
    "cloze_correct_tokens" [n] (the correct choice's only)."""
    import numpy as np

    texts = mcq_texts(tokenizer, mcq, options)
    letters, decisions = letter_logprobs(
        model,
        tokenizer,
        texts["letter"],
        chat=options.chat,
        batch_size=options.batch_size,
        record=record,
        desc=f"{mcq.label} {tag} letters",
        progress=options.progress,
    )
    out = {"letter": letters, "decisions": decisions}
    if "cloze" in texts:
        n = len(mcq.records)
        contexts, continuations = texts["cloze"]
        sums, counts, _ = continuation_logprobs(
            model,
            tokenizer,
            contexts,
            continuations,
            chat=options.chat,
            batch_size=options.batch_size,
            desc=f"{mcq.label} {tag} cloze",
            progress=options.progress,
        )
        if options.cloze == "all":
            out["cloze"] = sums.reshape(n, 4)
            out["cloze_tokens"] = counts.reshape(n, 4).astype(np.float64)
        else:
            out["cloze_correct"], out["cloze_correct_tokens"] = sums, counts.astype(np.float64)
    return out


def score_set(
    model, tokenizer, mcq, eval_options, *, letters: bool = True, record: bool = False, tag: str = ""
) -> dict:
    """`score_mcq`, or with `letters=False` the cloze inputs only (what "cloze_prob" needs);
    "decisions" are then those on the cloze inputs."""
    if letters:
        return score_mcq(model, tokenizer, mcq, eval_options, record=record, tag=tag)
    contexts, continuations = mcq_texts(tokenizer, mcq, eval_options)["cloze"]
    sums, counts, decisions = continuation_logprobs(
        model,
        tokenizer,
        contexts,
        continuations,
        chat=eval_options.chat,
        batch_size=eval_options.batch_size,
        record=record,
        desc=f"{mcq.label} {tag} cloze",
        progress=eval_options.progress,
    )
    return {"cloze_correct": sums, "cloze_correct_tokens": counts.astype(float), "decisions": decisions}


def known_questions(model, tokenizer, mcq: McqSet, options: EvalOptions, base_letters=None):
    """The known filter on the base model (`model` with its guardrails disabled); see `metrics.known_filter`."""
    from .metrics import known_filter

    wrap = (lambda text: chat_wrap(tokenizer, text)) if options.chat else (lambda text: text)
    rounds = iter(range(1, options.permutations + 1))

    def score(records):
        prompts = [wrap(letter_prompt(r, preamble=options.preamble, topic=mcq.name)) for r in records]
        with as_base(model):
            return letter_logprobs(
                model,
                tokenizer,
                prompts,
                chat=options.chat,
                batch_size=options.batch_size,
                desc=f"{mcq.label} known filter, permutation {next(rounds, '?')}",
                progress=options.progress,
            )[0]

    if base_letters is not None:
        next(rounds)
    return known_filter(mcq.records, score, options.permutations, first_scores=base_letters)


# -------------------------------------------------------------------------------------- scorer
class DirectScorer:
    """`modeling_dsg.evaluation.metrics` behind the `compute` signature of the evaluate module (its fallback)."""

    name = "modeling_dsg.evaluation.metrics"

    def compute(self, *, predictions, references, groups=None, lengths=None):
        from .metrics import compute_choice_metrics

        return compute_choice_metrics(predictions, references, groups=groups, lengths=lengths)


def load_scorer(path=None):
    """The `dsg_unlearning` evaluate module, loaded with `evaluate.load(<local path>)` (works offline).

    Returns (scorer with `.compute(predictions=, references=, groups=, lengths=)`, a description). If the
    module folder is not there (an installation without the package's `evaluation/dsg_unlearning/`), the
    same function is called directly (`DirectScorer`) and the description says so.
    """
    path = Path(path) if path is not None else METRIC_DIR
    if not (path / f"{path.name}.py").is_file():
        return DirectScorer(), f"{DirectScorer.name} (evaluate module {path} not found)"
    import evaluate

    try:
        return evaluate.load(str(path), keep_in_memory=True), f"evaluate.load({str(path)!r})"
    except Exception as err:  # e.g. an evaluate version that cannot load it: same numbers, said so
        return DirectScorer(), f"{DirectScorer.name} (evaluate.load failed: {err})"


def mcq_metrics(scorer, scores: dict, answers, groups) -> dict:
    """{"letter": metrics, "cloze": metrics}: the letter scores (and every choice's cloze scores) through the
    scorer, per group too when `groups`; the correct choice's cloze log-likelihood alone directly."""
    from .metrics import correct_loglikelihood

    by_group = {"groups": list(groups)} if groups else {}
    out = {"letter": scorer.compute(predictions=scores["letter"].tolist(), references=answers.tolist(), **by_group)}
    if "cloze" in scores:
        out["cloze"] = scorer.compute(
            predictions=scores["cloze"].tolist(),
            references=answers.tolist(),
            lengths=scores["cloze_tokens"].tolist(),
            **by_group,
        )
    elif "cloze_correct" in scores:
        out["cloze"] = correct_loglikelihood(scores["cloze_correct"], scores["cloze_correct_tokens"])
    return out
