"""The embedded default: SmolLM2-135M-Instruct with biology as the forget domain, from the shared folder.

Everything is read from `paths.shared_dir()` (see `data/README.md` there); nothing is copied
into the repository. Every choice below is deterministic and independent of Python's `hash()`
randomization, so every machine builds the same sets.

Splits
    Each question goes to "build" or "heldout" by a stable hash:
    `u = int(sha256(key)[:8], 16) / 2**32`, "heldout" iff `u < fraction`, where the key is
    `"wmdp:" + question` for WMDP-bio, `"mmlu:" + subject + ":" + question` for MMLU and
    `"wiki:" + title` for WikiText articles. `HELDOUT_FRACTION = 0.5` for questions (about half of
    WMDP-bio and of MMLU is kept for evaluation) and `WIKI_HELDOUT_FRACTION = 0.25` for WikiText
    articles (the test file has only ~60 articles, and most of them feed the SAE training text).
    "build" texts select features and calibrate the guard; "heldout" texts are only for evaluation
    and are never used for building or for SAE training.

Subjects
    `BIO_SUBJECTS` (forget side): anatomy, college_biology, high_school_biology, medical_genetics,
    virology. `AMBIGUOUS_SUBJECTS` (medicine and health, in neither forget nor retain, because
    they overlap biology heavily and would blur the boundary either way): clinical_knowledge,
    college_medicine, professional_medicine, nutrition, human_aging, human_sexuality. Every other
    subject is non-biology (retain side).

WordNet
    `BIO_LEXNAMES` = noun.animal, noun.plant, noun.body (organisms and anatomy).
    `AMBIGUOUS_LEXNAMES` = noun.substance (proteins, toxins and chemicals mixed together),
    noun.state (diseases among other states), noun.process, noun.phenomenon, noun.food, verb.body:
    in neither forget nor retain. All other lexnames are non-biology.
    A gloss is written as `"dog, domestic dog, Canis familiaris: a member of the genus Canis ..."`
    (the synset's words joined by ", ", a colon, the gloss) and `GLOSSES_PER_DOC = 5` glosses form
    one document (joined by newlines), so a document is paragraph-sized rather than a 20-token
    fragment. Forget and retain each take a deterministic sample of `N_GLOSS_DOCS = 200` such
    documents (glosses ordered by sha256 of the synset id, then grouped).

Text sets
    forget_texts(split)  WMDP-bio MCQ prompts + MMLU biology-subject MCQ prompts of that split
                         + bio gloss documents. MCQ prompts use `sources.mcq_prompt`
                         (lm-eval-harness format, ends with "Answer:").
    retain_texts(split)  WikiText paragraphs of that split + non-biology MMLU MCQ prompts of that
                         split (same format as the forget side, so format features do not pass the
                         filter) + non-bio gloss documents.
    forget_texts(split, tokenizer), retain_texts(split, tokenizer)
                         what `dsg demo` builds from: the same questions in the three formats users
                         send (bare, lm-eval preamble, chat template) on both sides, the paragraphs bare
                         and as a chat turn, no glosses; the gate is fit and calibrated on these.
    heldout_prompts()    {"bio": WMDP-bio heldout prompts, "mmlu_bio": MMLU biology heldout,
                          "mmlu_nonbio": MMLU non-biology heldout, "wikitext": heldout WikiText
                          paragraphs}.
    sae_training_texts() general text for the SAE: build-split WikiText articles, every WordNet
                         gloss (grouped as above, all lexnames), build-split MMLU prompts of all
                         subjects and build-split WMDP-bio prompts, shuffled with a fixed seed.
                         Never a heldout question or heldout WikiText article.

`python -m modeling_dsg.embedded.data` prints the size of every set (texts and SmolLM2 tokens); the
figures are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import hashlib
import random
from functools import cache
from pathlib import Path

from ..data.mcq import chat_wrap, letter_prompt
from ..data.sources import mcq_prompt, read_jsonl, split_wikitext
from ..paths import shared_dir

HELDOUT_FRACTION = 0.5
WIKI_HELDOUT_FRACTION = 0.25
GLOSSES_PER_DOC = 5
N_GLOSS_DOCS = 200
WIKI_MIN_CHARS = 200  # shorter WikiText paragraphs (headings, one-liners) are dropped

BIO_SUBJECTS = frozenset({"anatomy", "college_biology", "high_school_biology", "medical_genetics", "virology"})
AMBIGUOUS_SUBJECTS = frozenset(
    {"clinical_knowledge", "college_medicine", "professional_medicine", "nutrition", "human_aging", "human_sexuality"}
)
BIO_LEXNAMES = frozenset({"noun.animal", "noun.plant", "noun.body"})
AMBIGUOUS_LEXNAMES = frozenset(
    {"noun.substance", "noun.state", "noun.process", "noun.phenomenon", "noun.food", "verb.body"}
)


# ----------------------------------------------------------------------------------------- files
def seeded_sample(texts, n: int, seed: int = 0) -> list:
    """`n` of `texts` drawn with `random.Random(seed)` (all of them, in order, when there are at most `n`)."""
    texts = list(texts)
    if len(texts) <= n:
        return texts
    return random.Random(seed).sample(texts, n)


def gguf_path() -> Path:
    """The shared SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return shared_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def wmdp_path() -> Path:
    return shared_dir() / "data" / "wmdp" / "bio.jsonl"


def mmlu_path() -> Path:
    return shared_dir() / "data" / "mmlu" / "test.jsonl"


def wikitext_path() -> Path:
    return shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.raw"


def wordnet_path() -> Path:
    return shared_dir() / "data" / "wordnet" / "glosses.jsonl"


# ---------------------------------------------------------------------------------------- splits
def stable_unit(key: str) -> float:
    """A number in [0, 1) from sha256(key): the same on every machine and every run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def split_of(key: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    return "heldout" if stable_unit(key) < heldout_fraction else "build"


def _check_split(split: str) -> None:
    if split not in ("build", "heldout"):
        raise ValueError(f"split must be 'build' or 'heldout', not {split!r}")


# ------------------------------------------------------------------------------------------ data
@cache
def _wmdp() -> tuple[dict, ...]:
    return tuple(read_jsonl(wmdp_path()))


@cache
def _mmlu() -> tuple[dict, ...]:
    return tuple(read_jsonl(mmlu_path()))


@cache
def _wordnet() -> tuple[dict, ...]:
    return tuple(read_jsonl(wordnet_path()))


@cache
def _wiki_articles() -> tuple[str, ...]:
    return tuple(split_wikitext(wikitext_path().read_text(encoding="utf-8")))


def _wiki_title(article: str) -> str:
    return article.split("\n", 1)[0].strip(" =")


def wmdp_records(split: str) -> list[dict]:
    _check_split(split)
    return [r for r in _wmdp() if split_of("wmdp:" + r["question"]) == split]


def mmlu_records(split: str, kind: str) -> list[dict]:
    """MMLU records of a split; kind is "bio", "nonbio" or "all" (ambiguous subjects only in "all")."""
    _check_split(split)
    out = []
    for r in _mmlu():
        if split_of(f"mmlu:{r['subject']}:{r['question']}") != split:
            continue
        bio = r["subject"] in BIO_SUBJECTS
        nonbio = not bio and r["subject"] not in AMBIGUOUS_SUBJECTS
        if kind == "all" or (kind == "bio" and bio) or (kind == "nonbio" and nonbio):
            out.append(r)
    return out


def _prompts(records) -> list[str]:
    return [mcq_prompt(r["question"], r["choices"]) for r in records]


def wiki_articles(split: str) -> list[str]:
    _check_split(split)
    return [a for a in _wiki_articles() if split_of("wiki:" + _wiki_title(a), WIKI_HELDOUT_FRACTION) == split]


def wiki_paragraphs(split: str) -> list[str]:
    """Paragraphs (non-heading lines of at least WIKI_MIN_CHARS characters) of that split's articles."""
    out = []
    for article in wiki_articles(split):
        for line in article.split("\n"):
            line = line.strip()
            if len(line) >= WIKI_MIN_CHARS and not line.startswith("="):
                out.append(line)
    return out


def format_gloss(record: dict) -> str:
    """`"dog, domestic dog, Canis familiaris: a member of the genus Canis ..."`."""
    words = ", ".join(w.replace("_", " ") for w in record["words"])
    return f"{words}: {record['gloss']}"


def gloss_docs(kind: str, n_docs: int | None = N_GLOSS_DOCS) -> list[str]:
    """Gloss documents of `GLOSSES_PER_DOC` glosses; kind "bio", "nonbio" or "all"; `n_docs=None` for all."""
    recs = []
    for r in _wordnet():
        bio = r["lexname"] in BIO_LEXNAMES
        nonbio = not bio and r["lexname"] not in AMBIGUOUS_LEXNAMES
        if kind == "all" or (kind == "bio" and bio) or (kind == "nonbio" and nonbio):
            recs.append(r)
    recs.sort(key=lambda r: hashlib.sha256(r["synset"].encode()).hexdigest())
    if n_docs is not None:
        recs = recs[: n_docs * GLOSSES_PER_DOC]
    return [
        "\n".join(format_gloss(r) for r in recs[i : i + GLOSSES_PER_DOC]) for i in range(0, len(recs), GLOSSES_PER_DOC)
    ]


# ------------------------------------------------------------------------------------- text sets
FORMATS = ("bare", "preamble", "chat")  # the prompt formats users send: plain, lm-eval's preamble, a chat turn


def forget_texts(split: str = "build", tokenizer=None) -> list[str]:
    """WMDP-bio + MMLU biology-subject MCQ prompts of `split`, plus bio WordNet gloss documents. With a chat
    `tokenizer`: the questions in the three formats users send (`formatted`), without glosses (what `dsg demo`
    builds from)."""
    questions = wmdp_records(split) + mmlu_records(split, "bio")
    if tokenizer is not None:
        return formatted(questions, "biology", tokenizer)
    return _prompts(questions) + gloss_docs("bio")


def retain_texts(split: str = "build", tokenizer=None) -> list[str]:
    """WikiText paragraphs + non-biology MMLU MCQ prompts of `split`, plus non-bio gloss documents. With a chat
    `tokenizer`: the questions in the three formats and the paragraphs bare and as a chat turn, without glosses."""
    paragraphs, questions = wiki_paragraphs(split), mmlu_records(split, "nonbio")
    if tokenizer is not None:
        return paragraphs + [chat_wrap(tokenizer, p) for p in paragraphs] + formatted(questions, "", tokenizer)
    return paragraphs + _prompts(questions) + gloss_docs("nonbio")


def prompts_in(records, fmt: str, tokenizer=None, topic: str = "") -> list[str]:
    """The MCQ prompts of `records` in one of `FORMATS`: "bare", "preamble" (the lm-eval preamble about the
    record's subject, else `topic`) or "chat" (a user turn of the tokenizer's chat template)."""
    if fmt == "bare":
        return _prompts(records)
    if fmt == "preamble":
        return [letter_prompt(r, preamble=True, topic=topic) for r in records]
    if fmt == "chat":
        return [chat_wrap(tokenizer, letter_prompt(r)) for r in records]
    raise ValueError(f"unknown prompt format {fmt!r} (one of {', '.join(FORMATS)})")


def formatted(records, topic: str, tokenizer) -> list[str]:
    """Each record's MCQ prompt in every one of `FORMATS`, format by format."""
    return [p for fmt in FORMATS for p in prompts_in(records, fmt, tokenizer, topic)]


def heldout_prompts() -> dict[str, list[str]]:
    """Evaluation prompts never used for building or SAE training."""
    return {
        "bio": _prompts(wmdp_records("heldout")),
        "mmlu_bio": _prompts(mmlu_records("heldout", "bio")),
        "mmlu_nonbio": _prompts(mmlu_records("heldout", "nonbio")),
        "wikitext": wiki_paragraphs("heldout"),
    }


def sae_training_texts(seed: int = 0) -> list[str]:
    """General text for the SAE (build splits only), shuffled with `seed`."""
    texts = (
        wiki_articles("build")
        + gloss_docs("all", n_docs=None)
        + _prompts(mmlu_records("build", "all"))
        + _prompts(wmdp_records("build"))
    )
    random.Random(seed).shuffle(texts)
    return texts


def _report() -> None:  # python -m modeling_dsg.embedded.data
    from transformers import AutoTokenizer

    from ..data.sources import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(str(gguf_path())))

    def n_tokens(texts):
        return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])

    for name, texts in [
        ("forget(build)", forget_texts()),
        ("retain(build)", retain_texts()),
        *[(f"heldout[{k}]", v) for k, v in heldout_prompts().items()],
        ("sae_training_texts", sae_training_texts()),
    ]:
        print(f"{name:24s} {len(texts):7d} texts {n_tokens(texts):9d} tokens")


if __name__ == "__main__":
    _report()
