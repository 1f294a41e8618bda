"""`dsg eval DIR`: the base model and the DSG model side by side, on forget and retain questions and text.

One run, one model instance: the base model is the DSG model inside `guardrails_disabled()`, the DSG
model is the same instance with its guardrails on (their decisions recorded with `record_guardrails()`).

This module is the command: `EvalOptions` and its checks, the run (`compare` scores base and DSG into the
report's rows and blocks, `add_baselines` adds other models' numbers), loading the folders,
`evaluate_folder` (the Python API) and the parser. The question sets and prompts are in `data/mcq.py`,
the forwards and scores in `scoring.py`, the report's schema and its writing (report.json, plots,
summary.md) in `report.py`, the formulas in `metrics.py`.

Inputs
    --forget-mcq / --retain-mcq  multiple-choice questions in the WMDP/MMLU schema (`question`,
        `choices`: 4 strings, `answer`: 0-3, optional `subject`): a local .jsonl or .parquet file, or a Hub
        data set `NAME[:CONFIG][@SPLIT]` (default split "test"; needs the Hub).
    --text  optional plain text (any `sources.load_texts` source) for the per-token loss.

Prompts (lm-eval-harness' WMDP/MMLU format, `sources.mcq_prompt`)
    letter prompt   "{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"
    cloze context   "{question}\\nAnswer:"
    `--preamble` puts "The following are multiple choice questions (with answers) about {topic}.\\n\\n" in
    front (topic: the record's subject with "_" as spaces, else the data set's name). `--chat` sends the
    text as a user turn through the tokenizer's chat template (with the generation prompt); otherwise it
    is tokenized as is, with the tokenizer's own special tokens.
    The answer continuation is " A" ... " D" (" {choice}" for cloze), without the space under `--chat`
    (the assistant turn starts on a new line). Context and continuation are tokenized together and split
    after the context's tokens, as lm-eval-harness does.

Metrics (per data set, for base and DSG; formulas in `metrics.py`)
    letter scores   s_j = log P(continuation j | prompt) over the full vocabulary, j = A..D, from one
                    forward of the prompt (left padded, last positions' logits only). Each letter must be
                    one token after a prefix shared by all four (with most BPE tokenizers " A" is one
                    token and the prefix is empty; a byte-level tokenizer gives a shared " ").
                    accuracy = [argmax_j s_j == answer]; correct-letter probability = softmax_j(s)[answer];
                    correct-letter raw probability = exp(s_answer).
    cloze           L_j = sum of log P over the tokens of choice j's text after the cloze context;
                    cloze log-likelihood = L_answer (and L_answer / its token count). `--cloze correct`
                    (default) scores the correct choice only (1 forward per question), `--cloze all`
                    every choice (4 forwards), which adds cloze accuracy = [argmax_j L_j == answer];
                    `--cloze none` skips cloze scoring.
    text            NLL per token = sum of token NLLs / number of predicted tokens (first
                    `--text-max-tokens` tokens of each text); loss added = DSG - base.
    trigger rates   per guardrail, the fraction of letter prompts (and texts) on which it fired, per data
                    set and per subject.
    known filter    (the DSG paper's protocol) the questions the *base* model answers correctly under each
                    of the first `--permutations` permutations of the choices (`metrics.permutation_order`:
                    the identity, the other cyclic shifts, then a fixed shuffle of the rest); the metrics
                    are reported on the kept questions as well. A question leaves at its first wrong
                    answer, so the cost is about (1 + accuracy + ...) forwards per question, not 24.
    The multiple-choice numbers are computed by the `evaluate` module `modeling_dsg/evaluation/dsg_unlearning`
    (`evaluate.load(path)`, offline), which wraps `metrics.compute_choice_metrics`; where that folder is not
    installed the same function is called directly (report.json `settings.scorer` says which).

    The DSG pass decides per sequence on the whole scored input (the prompt, plus for cloze the choice
    text), in one forward: the guard's decision on a prompt is the one it takes in deployment.

    The DSG column depends on each guardrail's `action`: `clamp` edits the rows it fires on; `monitor`
    edits nothing, so every DSG number equals the base's (the trigger rates are the decisions it would
    take); `refuse` puts all the probability on the refusal's next token at every position of the rows it
    fires on, so there the letter scores are all equal (float32's minimum): correct-letter probability
    1/4, raw probability 0, accuracy 0 (all letters tie: no answer), and the cloze and text
    log-likelihoods about -3.4e38 per token. summary.md says so under the results table (`action_notes`).

Baselines and dilution
    `--baseline NAME=DIR` (repeatable) scores another model (an RMU folder, a static build, ...) on the
    same sets with the DSG model's tokenizer; each results row gets `baselines: {NAME: value}`.
    `--dilution` runs the dilution attack on the forget prompts (`dilution.py`): 1x/2x/5x/10x their length
    of filler in front, after the prompt and between its two halves, and per dynamic guardrail and cell the
    fraction of the prompts that fired that no longer fire.

Fluency
    `--fluency N` (`fluency.measure_fluency`): greedy answers (`--fluency-tokens`, default 32; the letter prompt
    as a chat user turn when the tokenizer has a template) to the first N forget questions whose prompt fires
    and to the first N retain questions, from the DSG model and from the base, each measured with the base
    model: NLL per generated token (DSG next to the base's own answers), repeated 3-gram share and distinct-2
    on words, and how often the correct choice's text appears (answer leak). report.json "fluency";
    summary.md gets the table and the first three generations side by side.

Several processes
    `torchrun --nproc_per_node N -m modeling_dsg eval ...` (or `accelerate launch`; `modeling_dsg.distributed`):
    every process loads the model and the sets; every forward (`scoring.batched_forward`: letters, cloze, text,
    the known filter's permutations, baselines, the dilution attack) and the fluency generations run batch r,
    r + N, ... in process r, and each scoring function gathers its per-row results and decisions from all
    processes, so every process holds the report one process makes. Process 0 alone writes REPORT_DIR and
    prints; report.json records the process count in `timings.scoring_processes`.

Outputs (REPORT_DIR, written atomically)
    report.json  the schema of `report.py` (checked before writing; `cards.py` reads it): schema_version,
                 model, results rows {dataset, metric, base, dsg, n, higher_is_better, baselines,
                 dataset_id?, dataset_config?, dataset_split?}, baselines, baseline_models?, trigger_rates
                 {dataset: {guardrail: {rate, fired, n}}}, dilution?, plus trigger_rates_by_subject,
                 accuracy_by_subject, known_filter, rho summaries, metrics (every number), datasets,
                 guardrails, settings, timings, plots and versions. Numbers that cannot be computed are null.
    *.png        rho_<guardrail>.png (forget and retain rho histograms with the tau line),
                 trigger_rates_<guardrail>.png (per subject), tradeoff_accuracy.png and
                 tradeoff_cloze.png (forget metric against retain metric, base and DSG).
    summary.md   the results, trigger-rate, dilution and known-filter tables in Markdown.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import distributed
from ..data.mcq import LETTERS, PREAMBLE, McqSet, answer_prefix, check_chat, load_mcq, load_text_set
from ..errors import DSGError, raise_first
from ..options import add_options, from_args, option
from ..runtime.configuration_dsg import WINDOWED
from .report import SCHEMA_VERSION, clean_json, result_row, summary_markdown, write_report
from .scoring import as_base, known_questions, load_scorer, mcq_metrics, score_mcq, text_nll

DTYPES = ("float32", "bfloat16", "float16")
CLOZE_MODES = ("correct", "all", "none")


@dataclass
class EvalOptions:
    """Every knob of `dsg eval`, with its default; each field is also a `dsg eval` option."""

    chat: bool = option(False, help="prompts as a user turn of the tokenizer's chat template")
    preamble: bool = option(
        False, help="start prompts with 'The following are multiple choice questions (with answers) about {subject}.'"
    )
    limit: int | None = option(None, metavar="N", help="use only the first N questions (and texts) of each source")
    batch_size: int = option(8, help="rows per forward")
    known_filter: bool = option(
        True,
        negatable=True,
        help="also report on the questions the base model answers correctly under every permutation (default: on)",
    )
    permutations: int = option(24, help="permutations for the known filter (1-24)")
    cloze: str = option(
        "correct",
        choices=CLOZE_MODES,
        help="cloze scoring: the correct choice's text only (default), every choice (adds cloze accuracy; "
        "4 forwards per question), or none",
    )
    text_max_tokens: int = option(512, help="cut each text to this many tokens")
    device: str = option("cpu")
    dtype: str = option("float32", choices=DTYPES)
    forget_name: str | None = option(None, help="name of the forget set in the report (default: the file stem)")
    retain_name: str | None = option(None, help="name of the retain set in the report")
    text_name: str | None = option(None, help="name of the text set in the report")
    progress: bool = option(True, help="no progress bars")
    dilution: bool = option(
        False,
        help="also run the dilution attack: forget prompts with 1x/2x/5x/10x their length of filler (the "
        "--text source, else the retain questions) in front, after, or between the prompt's two halves; "
        "how many that fired no longer fire",
    )
    fluency: int | None = option(
        None,
        metavar="N",
        help="also generate greedy answers (chat template) to up to N forget questions that fire and N retain "
        "questions, base and DSG, and measure them with the base model: NLL per token, repetition, "
        "answer leak (report.json 'fluency', a table and examples in summary.md)",
    )
    fluency_tokens: int = option(32, metavar="T", help="new tokens per fluency generation (default 32)")

    def validate(self) -> None:
        """Refuse bad values before any model is loaded: one `DSGError`."""
        o = self
        raise_first(
            [
                (o.batch_size >= 1, f"--batch-size must be at least 1, got {o.batch_size}"),
                (1 <= o.permutations <= 24, f"--permutations must be between 1 and 24, got {o.permutations}"),
                (o.limit is None or o.limit >= 1, f"--limit must be at least 1, got {o.limit}"),
                (o.text_max_tokens >= 2, f"--text-max-tokens must be at least 2, got {o.text_max_tokens}"),
                (o.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {o.dtype!r}"),
                (o.cloze in CLOZE_MODES, f"--cloze must be one of {', '.join(CLOZE_MODES)}, got {o.cloze!r}"),
                (o.fluency is None or o.fluency >= 1, f"--fluency must be at least 1, got {o.fluency}"),
                (o.fluency_tokens >= 1, f"--fluency-tokens must be at least 1, got {o.fluency_tokens}"),
            ]
        )


# -------------------------------------------------------------------------------------- the run
MCQ_ROWS = [  # (kind, key, metric name, shown on the known subset too)
    ("letter", "accuracy", "accuracy", True),
    ("letter", "choice_prob", "correct-letter probability", True),
    ("letter", "correct_prob", "correct-letter raw probability", False),
    ("cloze", "accuracy", "cloze accuracy", False),
    ("cloze", "correct_logprob", "cloze log-likelihood", False),
    ("cloze", "correct_logprob_per_length", "cloze log-likelihood per token", True),
]


def _subset(scores: dict, mask) -> dict:
    return {k: v[mask] for k, v in scores.items() if k != "decisions"}


def _guardrails(model) -> list[dict]:
    out = []
    for g in getattr(model, "guards", []):
        score = getattr(g, "score", "fraction")
        action = getattr(g, "action", "clamp")
        out.append(
            {
                "name": g.name,
                "layer": g.layer,
                "mode": g.mode,
                "score": score,
                "tau": float(g.threshold),
                "n_features": len(g.features),
                **({"window": g.window} if score in WINDOWED else {}),
                "action": action,
                **({"refusal": g.refusal} if action == "refuse" else {}),
            }
        )
    return out


def compare(
    model,
    tokenizer,
    forget: McqSet,
    retain: McqSet,
    text: list[str] | None = None,
    options: EvalOptions | None = None,
    *,
    text_name: str = "text",
    scorer=None,
) -> tuple[dict, dict]:
    """Score base and DSG on the question sets (and text). Returns (report dict, arrays for the plots)."""
    import numpy as np

    from .metrics import summarize, token_nll, trigger_rates

    options = options or EvalOptions()
    options.validate()
    if options.chat:
        check_chat(tokenizer)
    timings: dict = {}
    start = time.perf_counter()
    if scorer is None:
        scorer, scorer_name = load_scorer()
    else:
        scorer_name = getattr(scorer, "name", type(scorer).__name__)
    timings["scorer_load_s"] = time.perf_counter() - start
    model.eval()
    report = {
        "results": [],
        "trigger_rates": {},
        "trigger_rates_by_subject": {},
        "accuracy_by_subject": {},
        "known_filter": {},
        "rho": {},
        "metrics": {},
        "datasets": {},
    }
    arrays = {"rho": {}, "fired": {}, "subjects": {}, "labels": {}}
    guards = _guardrails(model)

    def add_rows(label, metrics_base, metrics_dsg, hub, known=False):
        for kind, key, metric, on_known in MCQ_ROWS:
            if key not in metrics_base.get(kind, {}) or (known and not on_known):
                continue
            n = metrics_base[kind]["n"]
            if n == 0:
                continue
            report["results"].append(
                result_row(
                    label, metric, metrics_base[kind][key], metrics_dsg[kind][key], n=n, higher_is_better=True, hub=hub
                )
            )

    def add_rates(label, decisions, mask=None, groups=None):
        fired = {g: d["fired"] if mask is None else d["fired"][mask] for g, d in decisions.items()}
        rates = trigger_rates(fired, groups)
        report["trigger_rates"][label] = rates["overall"]
        if rates["by_group"]:
            report["trigger_rates_by_subject"][label] = rates["by_group"]
        return rates

    for mcq in (forget, retain):
        label, answers, subjects = mcq.label, mcq.answers, mcq.subjects
        start = time.perf_counter()
        with as_base(model):
            base = score_mcq(model, tokenizer, mcq, options, tag="base")
        timings[f"{label}: base_s"] = time.perf_counter() - start
        start = time.perf_counter()
        dsg = score_mcq(model, tokenizer, mcq, options, record=True, tag="DSG")
        timings[f"{label}: dsg_s"] = time.perf_counter() - start
        m_base, m_dsg = mcq_metrics(scorer, base, answers, subjects), mcq_metrics(scorer, dsg, answers, subjects)
        report["datasets"][label] = {"role": mcq.role, "source": mcq.source, "n": len(mcq.records), **mcq.hub}
        report["metrics"][label] = {"base": m_base, "dsg": m_dsg}
        add_rows(label, m_base, m_dsg, mcq.hub)
        add_rates(label, dsg["decisions"], groups=subjects)
        report["rho"][label] = {g: summarize(d["rho"]) for g, d in dsg["decisions"].items()}
        arrays["rho"][mcq.role] = {g: d["rho"] for g, d in dsg["decisions"].items()}
        arrays["fired"][mcq.role] = {g: d["fired"] for g, d in dsg["decisions"].items()}
        arrays["subjects"][mcq.role] = subjects
        arrays["labels"][mcq.role] = label
        if subjects:
            report["accuracy_by_subject"][label] = {
                s: {
                    "n": m_base["letter"]["by_group"][s]["n"],
                    "base": {k: m_base["letter"]["by_group"][s][k] for k in ("accuracy", "choice_prob")},
                    "dsg": {k: m_dsg["letter"]["by_group"][s][k] for k in ("accuracy", "choice_prob")},
                }
                for s in m_base["letter"]["by_group"]
            }
        if options.known_filter:
            start = time.perf_counter()
            kf = known_questions(model, tokenizer, mcq, options, base_letters=base["letter"])
            timings[f"{label}: known_filter_s"] = time.perf_counter() - start
            known_label = f"{label}, known" if label == mcq.role else f"{mcq.name} ({mcq.role}, known)"
            report["known_filter"][label] = {
                "permutations": len(kf.permutations),
                "n": len(mcq.records),
                "kept": kf.n_kept,
                "survivors": kf.survivors,
                "scored_prompts": kf.scored,
                "dataset": known_label,
            }
            if kf.n_kept:
                sub_groups = [subjects[i] for i in np.flatnonzero(kf.kept)] if subjects else None
                kb = mcq_metrics(scorer, _subset(base, kf.kept), answers[kf.kept], None)
                kd = mcq_metrics(scorer, _subset(dsg, kf.kept), answers[kf.kept], None)
                report["metrics"][known_label] = {"base": kb, "dsg": kd}
                add_rows(known_label, kb, kd, mcq.hub, known=True)
                add_rates(known_label, dsg["decisions"], kf.kept, sub_groups)

    if text:
        label = f"{text_name} (text)"
        start = time.perf_counter()
        with as_base(model):
            b_sum, b_count, _ = text_nll(
                model,
                tokenizer,
                text,
                max_tokens=options.text_max_tokens,
                batch_size=options.batch_size,
                desc=f"{label} base",
                progress=options.progress,
            )
        d_sum, d_count, decisions = text_nll(
            model,
            tokenizer,
            text,
            max_tokens=options.text_max_tokens,
            batch_size=options.batch_size,
            record=True,
            desc=f"{label} DSG",
            progress=options.progress,
        )
        timings[f"{label}: s"] = time.perf_counter() - start
        nb, nd = token_nll(b_sum, b_count), token_nll(d_sum, d_count)
        report["datasets"][label] = {"role": "text", "n": len(text), "tokens": nb["n_tokens"]}
        report["metrics"][label] = {"base": nb, "dsg": nd, "loss_added": nd["nll_per_token"] - nb["nll_per_token"]}
        report["results"].append(
            result_row(
                label, "NLL per token", nb["nll_per_token"], nd["nll_per_token"], n=len(text), higher_is_better=False
            )
        )
        add_rates(label, decisions)
        report["rho"][label] = {g: summarize(d["rho"]) for g, d in decisions.items()}
        arrays["rho"]["text"] = {g: d["rho"] for g, d in decisions.items()}
        arrays["labels"]["text"] = label

    if options.fluency:  # what a fired answer looks like (`fluency`): greedy generations, measured with the base
        from .fluency import measure_fluency

        start = time.perf_counter()
        report["fluency"] = measure_fluency(
            model,
            tokenizer,
            forget.records,
            retain.records,
            options.fluency,
            max_new_tokens=options.fluency_tokens,
            batch_size=options.batch_size,
            forget_label=forget.label,
            retain_label=retain.label,
        )
        timings["fluency_s"] = time.perf_counter() - start

    report["guardrails"] = guards
    report["settings"] = {
        **asdict(options),
        "letters": list(LETTERS),
        "answer_prefix": answer_prefix(options.chat),
        "preamble_text": PREAMBLE if options.preamble else None,
        "scorer": scorer_name,
    }
    report["timings"] = timings
    return report, arrays


def add_baselines(
    report: dict,
    baselines: dict,
    tokenizer,
    forget: McqSet,
    retain: McqSet,
    text: list[str] | None,
    options: EvalOptions,
    *,
    text_name: str = "text",
    scorer=None,
) -> dict:
    """Score other models (`baselines`: name -> model, e.g. an RMU folder or a static-clamping build) on the
    same sets and prompts; each results row gets `baselines: {name: value}` (null on known-subset rows)."""
    from .metrics import token_nll

    if scorer is None:
        scorer = load_scorer()[0]
    values: dict = {}
    for name, model in baselines.items():
        model.eval()
        start = time.perf_counter()
        for mcq in (forget, retain):
            scored = score_mcq(model, tokenizer, mcq, options, tag=name)
            metrics = mcq_metrics(scorer, scored, mcq.answers, mcq.subjects)
            for kind, key, metric, _ in MCQ_ROWS:
                if key in metrics.get(kind, {}):
                    values[(mcq.label, metric, name)] = metrics[kind][key]
        if text:
            sums, counts, _ = text_nll(
                model,
                tokenizer,
                text,
                max_tokens=options.text_max_tokens,
                batch_size=options.batch_size,
                desc=f"{text_name} {name}",
                progress=options.progress,
            )
            values[(f"{text_name} (text)", "NLL per token", name)] = token_nll(sums, counts)["nll_per_token"]
        report.setdefault("timings", {})[f"baseline {name}: s"] = time.perf_counter() - start
    for row in report["results"]:
        row["baselines"] = {name: values.get((row["dataset"], row["metric"], name)) for name in baselines}
    report["baselines"] = list(baselines)
    return report


def _versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    return {"modeling_dsg": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def load_dsg(folder, *, device: str = "cpu", dtype: str = "float32"):
    """A DSG model folder as (DSGForCausalLM in eval mode, tokenizer); a bad folder is a DSGError."""
    import torch

    from ..data.sources import load_dsg_model

    model, tokenizer, _ = load_dsg_model(folder, device=device, dtype=getattr(torch, dtype))
    return model, tokenizer


def parse_baselines(specs) -> dict:
    """["NAME=DIR", ...] -> {NAME: DIR}; each DIR must be a model folder."""
    out = {}
    for spec in specs or []:
        name, sep, folder = str(spec).partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise DSGError(f"--baseline takes NAME=DIR (e.g. RMU=out/rmu), got {spec!r}")
        if name in out or name in ("base", "DSG"):
            raise DSGError(f"--baseline name {name!r} is used twice or is reserved (base, DSG)")
        if not (Path(folder).expanduser() / "config.json").is_file():
            raise DSGError(f"--baseline {name}: {folder} is not a model folder (no config.json)")
        from ..data.sources import check_weight_files

        check_weight_files(Path(folder).expanduser(), f"--baseline {name}")  # before the long scoring, not after
        out[name.strip()] = str(Path(folder).expanduser())
    return out


def load_baseline(folder, *, device: str = "cpu", dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    from ..data.sources import LOAD_ERRORS, check_weight_files, one_line, quiet_transformers, to_device

    what = f"the baseline model in {folder}"
    check_weight_files(Path(folder), what)
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), trust_remote_code=True)
        except LOAD_ERRORS as err:
            raise DSGError(f"cannot load {what}: {one_line(err)}") from None
    return to_device(model, device, what).eval()


def evaluate_folder(
    model_dir,
    forget: str,
    retain: str,
    out,
    *,
    text: str | None = None,
    options: EvalOptions | None = None,
    overwrite: bool = False,
    baselines=None,
) -> dict:
    """The Python API of `dsg eval`: evaluate a DSG model folder and write REPORT_DIR. Returns the report.

    Over several processes each one returns the report (the other processes' without "plots", which process 0
    adds as it writes REPORT_DIR)."""
    from ..data.sources import check_dsg_folder
    from ..outputs import prepare_output
    from ..paths import atomic_output_dir
    from .dilution import check_dilution, filler_texts, measure_dilution

    options = options or EvalOptions()
    options.validate()
    distributed.init(options.device)  # launched over several processes: every one scores its batches, 0 writes
    out = prepare_output(
        out,
        overwrite,
        flag="--out",
        nested_ok=[Path(model_dir).expanduser() / "eval"],
        inputs={
            "the model folder DIR": model_dir,
            "the --forget-mcq source": forget,
            "the --retain-mcq source": retain,
            "the --text source": text,
            "the --baseline folder": list(parse_baselines(baselines).values()),
        },
    )
    config = check_dsg_folder(model_dir)
    if options.dilution:
        check_dilution(config.get("guardrails") or [])
    baseline_dirs = parse_baselines(baselines)
    # the cheap inputs first, so that a bad one fails before the model is loaded
    forget_set = load_mcq(forget, "forget", name=options.forget_name, limit=options.limit)
    retain_set = load_mcq(retain, "retain", name=options.retain_name, limit=options.limit)
    texts = load_text_set(text, limit=options.limit) if text else None
    text_name = options.text_name or (Path(text).stem if text and Path(text).expanduser().exists() else text) or "text"
    start = time.perf_counter()
    model, tokenizer = load_dsg(model_dir, device=options.device, dtype=options.dtype)
    if options.chat:
        check_chat(tokenizer)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    report, arrays = compare(model, tokenizer, forget_set, retain_set, texts, options, text_name=text_name)
    if baseline_dirs:
        others = {
            name: load_baseline(folder, device=options.device, dtype=options.dtype)
            for name, folder in baseline_dirs.items()
        }
        vocab = model.config.get_text_config().vocab_size
        for name, other in others.items():
            if other.config.get_text_config().vocab_size != vocab:
                raise DSGError(
                    f"--baseline {name}: its vocabulary ({other.config.get_text_config().vocab_size}) is not "
                    f"the DSG model's ({vocab}); baselines are scored with the DSG model's tokenizer"
                )
        add_baselines(report, others, tokenizer, forget_set, retain_set, texts, options, text_name=text_name)
        report["baseline_models"] = baseline_dirs
    if options.dilution:
        dilution_start = time.perf_counter()
        filler, filler_name = filler_texts(retain_set, texts, text_name)
        report["dilution"] = measure_dilution(
            model, tokenizer, forget_set, filler, filler_name, options, report["guardrails"]
        )
        report["timings"]["dilution_s"] = time.perf_counter() - dilution_start
    report["timings"] = {
        "load_s": load_s,
        **report["timings"],
        "total_scoring_s": time.perf_counter() - start,
        "scoring_processes": distributed.world_size(),  # the forwards' shards (the report is the same)
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "model": str(Path(model_dir).expanduser().resolve()),
        "baselines": [],
        **report,
        "versions": _versions(),
    }
    if text:
        report["datasets"][f"{text_name} (text)"]["source"] = str(text)

    def write():
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            write_report(report, arrays, tmp)

    distributed.on_main(write, f"writing {out}")
    return clean_json(report)


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(p):
    p.add_argument("dir", metavar="DIR", help="a DSG model folder (written by `dsg build`)")
    p.add_argument(
        "--forget-mcq",
        required=True,
        metavar="SRC",
        help="forget-side questions: .jsonl/.parquet in the WMDP/MMLU schema, or a Hub data set NAME[:CONFIG][@SPLIT]",
    )
    p.add_argument("--retain-mcq", required=True, metavar="SRC", help="retain-side questions (same kinds)")
    p.add_argument(
        "--text", metavar="SRC", help="text for the per-token loss (.txt/.jsonl/.parquet or a Hub data set)"
    )
    p.add_argument(
        "--out", required=True, metavar="REPORT_DIR", help="the folder to write (report.json, PNGs, summary.md)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace REPORT_DIR if it exists")
    p.add_argument(
        "--baseline",
        action="append",
        metavar="NAME=DIR",
        help="also score another model on the same sets (e.g. RMU=out/rmu from `dsg rmu`, or a static build); "
        "repeatable",
    )
    add_options(p, EvalOptions)


def options_from_args(args) -> EvalOptions:
    return from_args(EvalOptions, args)


def run(args):
    report = evaluate_folder(
        args.dir,
        args.forget_mcq,
        args.retain_mcq,
        args.out,
        text=args.text,
        options=options_from_args(args),
        overwrite=args.overwrite,
        baselines=args.baseline,
    )
    if not distributed.is_main():  # one process reports (they all hold the same report)
        return
    print(summary_markdown(report), end="")
    print(f"wrote {Path(args.out).expanduser().resolve()}")
