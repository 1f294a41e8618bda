"""`dsg eval` and its scoring on models whose answers are known by hand.

- A *bigram* model (the next token's logits depend only on the current token, through a table we set):
  letter, cloze and text log-likelihoods are sums of table entries, computed here with numpy.
- An *oracle* model that reads each prompt and answers the option whose text is "right", and one that
  always answers "A": the known-questions filter keeps exactly the questions we expect, through the real
  prompt building and letter scoring.
- A tiny Llama DSG model whose guardrail "zeta" fires exactly on texts full of the marker "z": trigger
  rates per data set and per subject are counts we know; retain questions (no marker) get bit-identical
  base and DSG numbers; every reported number is checked against single-row forwards done here.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch
from test_build import layer_hidden, mcq_text, words

from modeling_dsg.data import mcq as mcq_data
from modeling_dsg.errors import DSGError
from modeling_dsg.evaluation import evaluate as evaluation
from modeling_dsg.evaluation import metrics, scoring

G = "Ġ"  # the byte-level tokenizer's space


def tid(tok, symbol: str) -> int:
    return tok.convert_tokens_to_ids(G if symbol == " " else symbol)


# ------------------------------------------------------------------------------------ fake models
class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: a causal LM whose every probability is a table lookup."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0, **kwargs):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class Oracle(torch.nn.Module):
    """Reads each (unpadded) prompt and puts its last-position logit on the letter whose option text is
    "right" (or always on `always`)."""

    def __init__(self, tok, always: str | None = None):
        super().__init__()
        self.tok, self.always = tok, always
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen = 0

    def forward(self, input_ids, attention_mask, logits_to_keep=0, **kwargs):
        logits = torch.zeros(*input_ids.shape, tiny.VOCAB)
        for b in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[b][attention_mask[b].bool()])
            found = re.search(r"^([ABCD])\. right$", text, re.M)
            letter = self.always or (found.group(1) if found else "D")
            logits[b, -1, tid(self.tok, letter)] = 5.0
            self.seen += 1
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def log_softmax(x) -> np.ndarray:
    return metrics.log_softmax(np.asarray(x, dtype=np.float64))


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def mcq(records, name="set", role="forget") -> mcq_data.McqSet:
    return mcq_data.McqSet(name=name, role=role, source="test", records=mcq_data.validate_mcq(records, "test"))


RECORDS = [
    {"question": "Which one?", "choices": ["cat", "dog", "emu", "yak"], "answer": a, "subject": None}
    for a in (1, 1, 0, 3, 2)
]


# ---------------------------------------------------------------------------------- scoring by hand
def test_letter_scores_of_a_bigram_model(tok):
    """P(" " | ":") = 1/2 and P(letter | " ") = (0.1, 0.5, 0.3, 0.1): every question has the letter
    scores log(1/2) + log(p), so accuracy = share of answers B, choice_prob = mean p[answer] and the raw
    probability of the correct letter = mean p[answer] / 2."""
    table = torch.randn(tiny.VOCAB, tiny.VOCAB, generator=torch.Generator().manual_seed(0))
    colon, space = tid(tok, ":"), tid(tok, " ")
    table[colon] = -1e4
    table[colon, space] = table[colon, tid(tok, "x")] = 0.0
    p = np.array([0.1, 0.5, 0.3, 0.1])
    table[space] = -1e4
    for letter, value in zip("ABCD", p):
        table[space, tid(tok, letter)] = float(np.log(value))
    model = Bigram(table)
    records = [dict(r, question=r["question"] + " " * i) for i, r in enumerate(RECORDS)]  # lengths differ
    prompts = [mcq_data.letter_prompt(r) for r in records]
    scores, decisions = scoring.letter_logprobs(model, tok, prompts, batch_size=2, progress=False)
    np.testing.assert_allclose(scores, np.tile(np.log(0.5) + np.log(p), (5, 1)), rtol=0, atol=1e-5)
    assert decisions == {}  # not a DSG model, nothing recorded

    answers = np.array([r["answer"] for r in records])
    out = scoring.DirectScorer().compute(predictions=scores, references=answers)
    assert out["accuracy"] == pytest.approx(2 / 5)
    assert out["choice_prob"] == pytest.approx(p[answers].mean(), abs=1e-6)
    assert out["correct_prob"] == pytest.approx(p[answers].mean() / 2, abs=1e-6)


def test_cloze_and_text_loglikelihoods_of_a_bigram_model(tok):
    table = torch.randn(tiny.VOCAB, tiny.VOCAB, generator=torch.Generator().manual_seed(1))
    model = Bigram(table)
    logp = log_softmax(table.numpy())

    def by_hand(ids):  # sum of log P(ids[t] | ids[t-1]) for t >= 1
        return sum(logp[a, b] for a, b in zip(ids[:-1], ids[1:]))

    contexts = ["Which one?\nAnswer:", "Which one is it, then?\nAnswer:", "Q\nAnswer:"]
    continuations = [" cat", " a tall dog", " x"]
    sums, counts, _ = scoring.continuation_logprobs(model, tok, contexts, continuations, batch_size=2, progress=False)
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        ids = tok(c + x)["input_ids"]  # BOS + one token per character
        n = len(x)
        assert counts[i] == n
        assert sums[i] == pytest.approx(by_hand(ids[-n - 1 :]), abs=1e-4)

    texts = ["the first text", "a second, longer text about nothing at all", "z"]
    nll, count, _ = scoring.text_nll(model, tok, texts, max_tokens=10, batch_size=2, progress=False)
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"][:10]
        assert count[i] == len(ids) - 1
        assert nll[i] == pytest.approx(-by_hand(ids), abs=1e-4)
    assert metrics.token_nll(nll, count)["nll_per_token"] == pytest.approx(nll.sum() / count.sum())


def test_chat_prompts_answer_without_a_space(tok):
    """Under --chat the prompt is the chat template's user turn plus the generation prompt, and the letter
    follows the template's last token directly (no space)."""
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>\n{% endif %}"
    )
    table = torch.randn(tiny.VOCAB, tiny.VOCAB, generator=torch.Generator().manual_seed(2))
    model = Bigram(table)
    options = evaluation.EvalOptions(chat=True, cloze="all", progress=False, batch_size=3)
    scored = scoring.score_mcq(model, chat_tok, mcq(RECORDS), options)
    logp = log_softmax(table.numpy())
    newline = tid(tok, "\u010a")  # byte-level "\n"
    want = logp[newline, [tid(tok, L) for L in "ABCD"]]
    np.testing.assert_allclose(scored["letter"], np.tile(want, (5, 1)), rtol=0, atol=1e-5)
    prompt = mcq_data.chat_wrap(chat_tok, mcq_data.letter_prompt(RECORDS[0]))
    assert prompt == "<user>\n" + mcq_text(RECORDS[0]) + "\n<assistant>\n"
    # cloze: each choice's text right after the generation prompt, one token per character
    want_cat = logp[newline, tid(tok, "c")] + logp[tid(tok, "c"), tid(tok, "a")] + logp[tid(tok, "a"), tid(tok, "t")]
    assert scored["cloze"][0, 0] == pytest.approx(want_cat, abs=1e-4)
    assert scored["cloze_tokens"][0].tolist() == [3, 3, 3, 3]
    correct = scoring.score_mcq(model, chat_tok, mcq(RECORDS), evaluation.EvalOptions(chat=True, progress=False))
    assert set(correct) == {
        "letter",
        "decisions",
        "cloze_correct",
        "cloze_correct_tokens",
    }  # the default: correct only
    answers = [r["answer"] for r in RECORDS]
    np.testing.assert_allclose(correct["cloze_correct"], scored["cloze"][range(5), answers], rtol=0, atol=1e-5)
    none = scoring.score_mcq(
        model, chat_tok, mcq(RECORDS), evaluation.EvalOptions(chat=True, cloze="none", progress=False)
    )
    assert set(none) == {"letter", "decisions"}
    with pytest.raises(DSGError, match="--chat: this tokenizer has no chat template"):
        mcq_data.check_chat(tok)


def test_preamble_and_letters_that_are_not_single_tokens(tok):
    record = dict(RECORDS[0], subject="high_school_biology")
    assert mcq_data.letter_prompt(record, preamble=True).startswith(
        "The following are multiple choice questions (with answers) about high school biology.\n\nWhich one?\nA. cat"
    )
    assert mcq_data.cloze_context(RECORDS[0], preamble=True, topic="zoology") == (
        "The following are multiple choice questions (with answers) about zoology.\n\nWhich one?\nAnswer:"
    )
    model = Bigram(torch.zeros(tiny.VOCAB, tiny.VOCAB))
    with pytest.raises(DSGError, match="are not single tokens after the prompt"):
        scoring.letter_logprobs(model, tok, ["Q\nAnswer:"], letters=["A", "BB", "C", "D"], progress=False)


# ------------------------------------------------------------------------------- the known filter
def filter_records():
    """Eight questions; the correct choice's text is "right" in questions 0, 2, 3, 5 only."""
    out = []
    for i, (answer, right_at) in enumerate([(0, 0), (1, 3), (2, 2), (3, 3), (0, 1), (1, 1), (2, 0), (3, 1)]):
        choices = [f"opt{i}{j}" for j in range(4)]
        choices[right_at] = "right"
        out.append({"question": f"Question {i}?", "choices": choices, "answer": answer})
    return out


def test_known_filter_through_the_prompts(tok):
    questions = mcq(filter_records())
    options = evaluation.EvalOptions(permutations=24, batch_size=3, progress=False)
    oracle = Oracle(tok)
    out = scoring.known_questions(oracle, tok, questions, options)
    assert np.flatnonzero(out.kept).tolist() == [0, 2, 3, 5] and out.survivors == [4] * 24
    assert oracle.seen == out.scored == 8 + 4 * 23

    always_a = Oracle(tok, always="A")
    assert scoring.known_questions(always_a, tok, questions, options).n_kept == 0
    one = scoring.known_questions(always_a, tok, questions, evaluation.EvalOptions(permutations=1, progress=False))
    assert np.flatnonzero(one.kept).tolist() == [0, 4]  # the questions whose answer is A


# ------------------------------------------------------------------------- the marker DSG, end to end
TAU = 0.05


class World:
    """A tiny Llama DSG folder whose guardrail fires on the marker "z", question files and a text file."""

    def __init__(self, root: Path):
        from modeling_dsg import DSGConfig, DSGForCausalLM

        rng = random.Random(0)
        self.root, self.tok = root, tiny.tiny_tokenizer()
        self.base = tiny.tiny_base("llama")
        forget = [
            {
                "question": words(rng, 8, "z"),
                "choices": [words(rng, 2, "z") for _ in range(4)],
                "answer": i % 4,
                "subject": "zoology",
            }
            for i in range(4)
        ]
        forget += [
            {"question": words(rng, 8), "choices": [words(rng, 2) for _ in range(4)], "answer": i, "subject": "botany"}
            for i in (1, 2)
        ]
        retain = [
            {
                "question": words(rng, 8),
                "choices": [words(rng, 2) for _ in range(4)],
                "answer": i % 4,
                "subject": "history" if i < 3 else "geography",
            }
            for i in range(5)
        ]
        retain[0]["question"] = words(rng, 30) + " z"  # one marker in a long question: flagged, but rho < tau
        self.forget, self.retain = forget, retain
        self.texts = [words(rng, 20, "z"), words(rng, 30), words(rng, 25)]
        self.forget_file, self.retain_file, self.text_file = (
            root / "bio.jsonl",
            root / "general.jsonl",
            root / "wiki.txt",
        )
        self.forget_file.write_text("".join(json.dumps(r) + "\n" for r in forget))
        self.retain_file.write_text("".join(json.dumps(r) + "\n" for r in retain))
        self.text_file.write_text("\n\n".join(self.texts) + "\n")

        # an SAE feature that detects the marker at the output of block 1 (fitted on every scored text)
        fit = [mcq_text(r) + " " for r in forget + retain] + self.texts
        fit += [f"{r['question']}\nAnswer: {c}" for r in forget + retain for c in r["choices"]]
        hidden, ids = layer_hidden(self.base, self.tok, fit)
        h, on = hidden[1], ids == tid(self.tok, "z")
        mean = h.mean(0)
        direction = (h[on].mean(0) - mean) / (h[on].mean(0) - mean).norm()
        proj = (h - mean) @ direction
        assert float(proj[on].min()) > float(proj[~on].max()) + 0.02  # an exact detector
        cut = (float(proj[on].min()) + float(proj[~on].max())) / 2
        guard = tiny.guardrail("standard", name="zeta", layer=1, d_sae=4, features=[1], threshold=TAU, clamp=6.0)
        model = DSGForCausalLM(
            DSGConfig(text_config=self.base.config.to_dict(), guardrails=[guard]), base_model=copy.deepcopy(self.base)
        ).eval()
        with torch.no_grad():
            sae = model.guards[0].sae
            for tensor in sae.parameters():
                tensor.zero_()
            sae.W_enc[:, 1] = 10 * direction
            sae.b_enc[1] = -10 * (float(mean @ direction) + cut)
            sae.W_dec[1] = torch.randn(tiny.HIDDEN, generator=torch.Generator().manual_seed(3))
        self.model_dir = root / "dsg"
        model.save_pretrained(self.model_dir)
        self.tok.save_pretrained(self.model_dir)
        self.dsg = model
        self.out = root / "report"
        self.run = run_cli(
            "eval",
            self.model_dir,
            "--forget-mcq",
            self.forget_file,
            "--retain-mcq",
            self.retain_file,
            "--text",
            self.text_file,
            "--out",
            self.out,
            "--forget-name",
            "biology",
            "--retain-name",
            "general",
            "--permutations",
            4,
            "--batch-size",
            4,
            "--cloze",
            "all",
            "--no-progress",
        )
        self.report = json.loads((self.out / "report.json").read_text())

    @torch.no_grad()
    def letters(self, record, guarded: bool):
        """Letter scores of one record from one unpadded forward; and the guardrail's (rho, fired)."""
        ids = self.tok(mcq_text(record) + " ", return_tensors="pt")["input_ids"]
        with self.dsg.record_guardrails() as records:
            if guarded:
                logits = self.dsg(input_ids=ids).logits[0]
            else:
                logits = self.base(input_ids=ids).logits[0]
        logp = log_softmax(logits[-2:].numpy())
        scores = logp[0, tid(self.tok, " ")] + logp[1, [tid(self.tok, L) for L in "ABCD"]]
        decision = (float(records[0]["rho"][0]), bool(records[0]["fired"][0])) if guarded else None
        return scores, decision

    @torch.no_grad()
    def cloze(self, record, guarded: bool):
        model = self.dsg if guarded else self.base
        sums, counts = [], []
        context = f"{record['question']}\nAnswer:"
        n_ctx = len(self.tok(context)["input_ids"])
        for choice in record["choices"]:
            ids = self.tok(context + " " + choice, return_tensors="pt")["input_ids"]
            logp = log_softmax(model(input_ids=ids[:, :-1]).logits[0].numpy())
            targets = ids[0, n_ctx:].numpy()
            sums.append(sum(logp[n_ctx - 1 + j, t] for j, t in enumerate(targets)))
            counts.append(len(targets))
        return sums, counts


def run_cli(*argv):
    import contextlib
    import io

    from modeling_dsg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("eval_world"))


def rows(report, dataset):
    return {r["metric"]: r for r in report["results"] if r["dataset"] == dataset}


def test_eval_runs_and_writes_the_report(world):
    assert world.run.code == 0, world.run.err
    assert sorted(p.name for p in world.out.iterdir()) == sorted(
        [
            "report.json",
            "summary.md",
            "rho_zeta.png",
            "trigger_rates_zeta.png",
            "tradeoff_accuracy.png",
            "tradeoff_cloze.png",
        ]
    )
    report = world.report
    assert (
        report["settings"]["scorer"].startswith("evaluate.load(") and "dsg_unlearning" in report["settings"]["scorer"]
    )
    assert report["guardrails"] == [
        {
            "name": "zeta",
            "layer": 1,
            "mode": "dynamic",
            "score": "fraction",
            "tau": TAU,
            "n_features": 1,
            "action": "clamp",
        }
    ]
    for r in report["results"]:
        assert {"dataset", "metric", "base", "dsg", "n", "higher_is_better"} <= set(r)
    assert report["datasets"]["biology (forget)"] == {"role": "forget", "source": str(world.forget_file), "n": 6}
    assert world.run.out.rstrip().endswith(f"wrote {world.out}")


def test_trigger_rates_are_counted_per_dataset_and_subject(world):
    rates = world.report["trigger_rates"]
    assert rates["biology (forget)"] == {"zeta": {"rate": 4 / 6, "fired": 4, "n": 6}}
    assert rates["general (retain)"] == {"zeta": {"rate": 0.0, "fired": 0, "n": 5}}
    assert rates["wiki (text)"] == {"zeta": {"rate": 1 / 3, "fired": 1, "n": 3}}
    by_subject = world.report["trigger_rates_by_subject"]
    assert by_subject["biology (forget)"] == {
        "botany": {"zeta": {"rate": 0.0, "fired": 0, "n": 2}},
        "zoology": {"zeta": {"rate": 1.0, "fired": 4, "n": 4}},
    }
    assert by_subject["general (retain)"] == {
        "geography": {"zeta": {"rate": 0.0, "fired": 0, "n": 2}},
        "history": {"zeta": {"rate": 0.0, "fired": 0, "n": 3}},
    }
    # the retain question with one marker: flagged, rho = 1 / counted tokens > 0, still not fired
    rho, fired = world.letters(world.retain[0], guarded=True)[1]
    n_counted = len(mcq_text(world.retain[0]) + " ")
    assert rho == pytest.approx(1 / n_counted) and not fired and rho < TAU
    assert world.report["rho"]["general (retain)"]["zeta"]["max"] == pytest.approx(rho, abs=1e-12)
    for r in world.forget[:4]:
        rho, fired = world.letters(r, guarded=True)[1]
        assert fired and rho > TAU


def test_every_number_matches_single_row_forwards(world):
    report = world.report
    for records, label in ((world.forget, "biology (forget)"), (world.retain, "general (retain)")):
        answers = np.array([r["answer"] for r in records])
        for column, guarded in (("base", False), ("dsg", True)):
            letters = np.array([world.letters(r, guarded)[0] for r in records])
            cloze = [world.cloze(r, guarded) for r in records]
            sums, counts = np.array([c[0] for c in cloze]), np.array([c[1] for c in cloze])
            want_letter = metrics.choice_metrics(letters, answers)
            want_cloze = metrics.choice_metrics(sums, answers, counts)
            got = rows(report, label)
            for metric, value in (
                ("accuracy", want_letter["accuracy"]),
                ("correct-letter probability", want_letter["choice_prob"]),
                ("correct-letter raw probability", want_letter["correct_prob"]),
                ("cloze accuracy", want_cloze["accuracy"]),
                ("cloze log-likelihood", want_cloze["correct_logprob"]),
                ("cloze log-likelihood per token", want_cloze["correct_logprob_per_length"]),
            ):
                assert got[metric][column] == pytest.approx(value, abs=1e-5), (label, column, metric)
                assert got[metric]["n"] == len(records) and got[metric]["higher_is_better"] is True
    # text: token-weighted NLL of each whole text (shorter than --text-max-tokens)
    for column, model in (("base", world.base), ("dsg", world.dsg)):
        total, count = 0.0, 0
        for text in world.texts:
            ids = world.tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = log_softmax(model(input_ids=ids).logits[0, :-1].numpy())
            total -= sum(logp[j, t] for j, t in enumerate(ids[0, 1:].numpy()))
            count += ids.shape[1] - 1
        row = rows(report, "wiki (text)")["NLL per token"]
        assert row[column] == pytest.approx(total / count, abs=1e-5) and row["higher_is_better"] is False
    added = report["metrics"]["wiki (text)"]["loss_added"]
    assert added == pytest.approx(row["dsg"] - row["base"], abs=1e-12) and added != 0  # the marked text fired


def test_unfired_rows_are_the_base_model_exactly(world):
    retain = rows(world.report, "general (retain)")
    assert all(r["dsg"] == r["base"] for r in retain.values())  # nothing fired on retain: bit-identical
    per_subject = world.report["accuracy_by_subject"]["biology (forget)"]
    assert per_subject["botany"]["dsg"] == per_subject["botany"]["base"]  # unfired forget questions too
    assert per_subject["zoology"]["dsg"]["choice_prob"] != per_subject["zoology"]["base"]["choice_prob"]
    assert per_subject["zoology"]["n"] == 4 and per_subject["botany"]["n"] == 2


def test_known_filter_counts_and_rows(world):
    for records, label, name in (
        (world.forget, "biology (forget)", "biology (forget, known)"),
        (world.retain, "general (retain)", "general (retain, known)"),
    ):
        kept = []
        for r in records:
            ok = True
            for perm in metrics.permutation_order(4):
                p = metrics.permute_record(r, perm)
                ok = ok and int(np.argmax(world.letters(p, guarded=False)[0])) == p["answer"]
            kept.append(ok)
        kf = world.report["known_filter"][label]
        assert kf["kept"] == sum(kept) and kf["n"] == len(records) and kf["permutations"] == 4
        assert kf["survivors"][-1] == sum(kept) and len(kf["survivors"]) == 4 and kf["dataset"] == name
        known = rows(world.report, name)
        if sum(kept):
            assert set(known) == {"accuracy", "correct-letter probability", "cloze log-likelihood per token"}
            assert known["accuracy"]["base"] == 1.0 and known["accuracy"]["n"] == sum(kept)
        else:
            assert known == {} and name not in world.report["trigger_rates"]


def test_known_subset_rows_limit_and_default_cloze(world, tmp_path):
    """With one permutation the known set is the questions the base answers right; its rows and trigger
    rates are those of that subset. `--limit 5` keeps the first five questions; the default cloze mode
    scores the correct choice only (no cloze accuracy)."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    result = run_cli(
        "eval",
        world.model_dir,
        "--forget-mcq",
        world.forget_file,
        "--retain-mcq",
        world.retain_file,
        "--out",
        out,
        "--forget-name",
        "biology",
        "--retain-name",
        "general",
        "--permutations",
        1,
        "--limit",
        5,
        "--batch-size",
        3,
        "--no-progress",
        "--overwrite",
    )
    assert result.code == 0, result.err
    assert not (out / "old.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["plots"]) == [
        "rho_zeta.png",
        "tradeoff_accuracy.png",
        "tradeoff_cloze.png",
        "trigger_rates_zeta.png",
    ]
    for records, label in ((world.forget[:5], "biology (forget)"), (world.retain[:5], "general (retain)")):
        got = rows(report, label)
        assert "cloze accuracy" not in got
        for column, guarded in (("base", False), ("dsg", True)):
            cloze = [world.cloze(r, guarded) for r in records]
            sums = np.array([c[0][r["answer"]] for c, r in zip(cloze, records)])
            counts = np.array([c[1][r["answer"]] for c, r in zip(cloze, records)])
            assert got["cloze log-likelihood"][column] == pytest.approx(sums.mean(), abs=1e-5)
            assert got["cloze log-likelihood per token"][column] == pytest.approx((sums / counts).mean(), abs=1e-5)
    n_known = 0
    for records, label, name in (
        (world.forget[:5], "biology (forget)", "biology (forget, known)"),
        (world.retain[:5], "general (retain)", "general (retain, known)"),
    ):
        base = np.array([world.letters(r, False)[0] for r in records])
        answers = np.array([r["answer"] for r in records])
        kept = np.argmax(base, axis=1) == answers
        assert report["known_filter"][label]["kept"] == int(kept.sum()) and report["known_filter"][label]["n"] == 5
        n_known += int(kept.sum())
        if not kept.any():
            continue
        guarded = [world.letters(r, True) for r, k in zip(records, kept) if k]
        want = metrics.choice_metrics(np.array([g[0] for g in guarded]), answers[kept])
        got = rows(report, name)
        assert got["accuracy"]["base"] == 1.0 and got["accuracy"]["n"] == int(kept.sum())
        assert got["accuracy"]["dsg"] == pytest.approx(want["accuracy"])
        assert got["correct-letter probability"]["dsg"] == pytest.approx(want["choice_prob"], abs=1e-5)
        fired = sum(g[1][1] for g in guarded)
        assert report["trigger_rates"][name]["zeta"] == {
            "rate": fired / kept.sum(),
            "fired": fired,
            "n": int(kept.sum()),
        }
    assert n_known > 0  # the subset rows were exercised


def test_plots_summary_and_model_card(world):
    from matplotlib.image import imread

    from modeling_dsg.publishing.cards import render_card

    for name in world.report["plots"]:
        image = imread(world.out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    summary = (world.out / "summary.md").read_text()
    assert "| dataset | metric | n | base | DSG | DSG − base |" in summary
    assert "| biology (forget) | accuracy ↑ | 6 |" in summary and "| wiki (text) | NLL per token ↓ | 3 |" in summary
    assert "| biology (forget) | 66.7% of 6 |" in summary and "![rho_zeta.png](rho_zeta.png)" in summary
    card = str(render_card(world.model_dir, eval_dir=world.out))
    assert "| biology (forget) | accuracy ↑ | 6 |" in card and "| general (retain) | cloze accuracy ↑ | 5 |" in card
    assert "66.7% of 6" in card and "0.0% of 5" in card and "eval/tradeoff_accuracy.png" in card
    assert "not measured" not in card.split("| biology (forget) | accuracy")[1].split("\n")[0]


def test_tradeoff_plot_takes_curves(tmp_path):
    from matplotlib.image import imread

    from modeling_dsg.evaluation.plots import plot_tradeoff

    series = [
        {"label": "base", "x": 0.5, "y": 0.4},
        {"label": "dynamic", "x": [0.49, 0.48, 0.45], "y": [0.3, 0.25, 0.2], "annotations": ["N=10", "N=20", "N=40"]},
        {"label": "static", "x": [0.45, 0.4], "y": [0.3, 0.22], "marker": "s"},
    ]
    path = plot_tradeoff(
        series, tmp_path / "t.png", xlabel="MMLU accuracy", ylabel="WMDP accuracy", vlines=[(0.495, "99% of base")]
    )
    assert imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match="different lengths"):
        plot_tradeoff([{"label": "x", "x": [1, 2], "y": [1]}], tmp_path / "u.png", xlabel="a", ylabel="b")


# ------------------------------------------------------------------------------- sources, bad input
def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"question": "Why?", "choices": ["a", "b", "c", "d"], "answer": 0}


def test_parquet_questions_and_names(tmp_path):
    import datasets

    records = [dict(GOOD, subject="virology"), dict(GOOD, answer=3, choices=["w", "x", "y", "z"], subject="anatomy")]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "bio.parquet"))
    got = mcq_data.load_mcq(tmp_path / "bio.parquet", "forget")
    assert got.records == records and got.label == "bio (forget)" and got.subjects == ["virology", "anatomy"]
    assert mcq_data.load_mcq(tmp_path / "bio.parquet", "forget", name="forget", limit=1).label == "forget"
    plain = mcq_data.load_mcq(_jsonl(tmp_path / "q.jsonl", [GOOD]), "retain")
    assert plain.subjects is None and plain.records == [dict(GOOD, subject=None)] and plain.hub == {}


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("schema", "record 2 has no 'choices' field"),
        ("three", "record 1: 'choices' must be a list of 4 strings, got 3"),
        ("range", "record 1: 'answer' must be the index 0-3 of the correct choice, got 4"),
        ("letter", "'answer' must be the index 0-3 of the correct choice, got 'B'"),
        ("empty", "has no questions"),
        ("json", "not valid JSON"),
        ("hub", "cannot reach the Hugging Face Hub"),
        ("suffix", "expected a .jsonl or .parquet file"),
        ("exists", "already exists (pass --overwrite to replace it)"),
        ("not_dsg", "model_type 'llama', expected 'dsg'"),
        ("permutations", "--permutations must be between 1 and 24, got 0"),
        ("chat", "--chat: this tokenizer has no chat template"),
    ],
)
def test_bad_inputs(world, tmp_path, case, message):
    good = _jsonl(tmp_path / "good.jsonl", [GOOD])
    forget, model_dir, extra = good, world.model_dir, []
    out = tmp_path / "out" / "report"
    if case == "missing":
        forget = tmp_path / "nothing.jsonl"
    elif case == "schema":
        forget = _jsonl(tmp_path / "f.jsonl", [GOOD, {"question": "q", "answer": 1}])
    elif case == "three":
        forget = _jsonl(tmp_path / "f.jsonl", [dict(GOOD, choices=["a", "b", "c"])])
    elif case == "range":
        forget = _jsonl(tmp_path / "f.jsonl", [dict(GOOD, answer=4)])
    elif case == "letter":
        forget = _jsonl(tmp_path / "f.jsonl", [dict(GOOD, answer="B")])
    elif case == "empty":
        forget = _jsonl(tmp_path / "f.jsonl", [])
    elif case == "json":
        forget = tmp_path / "f.jsonl"
        forget.write_text('{"question": "q",\n')
    elif case == "hub":
        forget = "cais/wmdp:wmdp-bio"
    elif case == "suffix":
        forget = tmp_path / "f.txt"
        forget.write_text("Why?\n")
    elif case == "exists":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("old")
    elif case == "not_dsg":
        model_dir = tmp_path / "plain"
        world.base.save_pretrained(model_dir)
    elif case == "permutations":
        extra = ["--permutations", 0]
    elif case == "chat":
        extra = ["--chat"]
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
    result = run_cli(
        "eval", model_dir, "--forget-mcq", forget, "--retain-mcq", good, "--out", out, "--no-progress", *extra
    )
    assert result.code == 2 and result.out == ""
    lines = result.err.strip().splitlines()
    assert lines[-1].startswith("dsg: error: ") and message in lines[-1] and "Traceback" not in result.err
    if case != "chat":  # the chat check comes after loading the model (which may log)
        assert len(lines) == 1, result.err
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
    assert after == before  # no temporary folder left behind


def test_baselines_are_scored_on_the_same_sets(world, tmp_path):
    """A baseline that is the base model itself reproduces the base column exactly; bad specs are refused."""
    plain = tmp_path / "plain"
    world.base.save_pretrained(plain)
    out = tmp_path / "with_baseline"
    run = run_cli(
        "eval",
        world.model_dir,
        "--forget-mcq",
        world.forget_file,
        "--retain-mcq",
        world.retain_file,
        "--text",
        world.text_file,
        "--out",
        out,
        "--no-known-filter",
        "--batch-size",
        4,
        "--no-progress",
        "--baseline",
        f"plain={plain}",
    )
    assert run.code == 0, run.err
    report = json.loads((out / "report.json").read_text())
    assert report["baselines"] == ["plain"]
    for row in report["results"]:
        assert row["baselines"]["plain"] == pytest.approx(row["base"], abs=1e-9), row
    assert "| plain |" in (out / "summary.md").read_text().splitlines()[4]
    for spec, message in [
        ("plain", "NAME=DIR"),
        (f"DSG={plain}", "reserved"),
        (f"x={tmp_path}", "not a model folder"),
    ]:
        bad = run_cli(
            "eval",
            world.model_dir,
            "--forget-mcq",
            world.forget_file,
            "--retain-mcq",
            world.retain_file,
            "--out",
            tmp_path / "bad",
            "--baseline",
            spec,
        )
        assert bad.code == 2 and message in bad.err and not (tmp_path / "bad").exists()
