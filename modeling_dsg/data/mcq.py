"""Multiple-choice question sets and the prompts made from them (what `dsg eval` and `dsg sweep` score).

Sets
    `McqSet` holds validated questions in the WMDP/MMLU schema (`question`, `choices`: 4 strings, `answer`:
    0-3, optional `subject`). `load_mcq` reads one from a local .jsonl or .parquet file or a Hub data set
    `NAME[:CONFIG][@SPLIT]` (`data.hub`; default split "test"); `validate_mcq` checks records record by
    record; `load_text_set` reads plain texts (any `sources.load_texts` source).

Prompts (lm-eval-harness' WMDP/MMLU format, `sources.mcq_prompt`)
    letter prompt   "{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"  (`letter_prompt`)
    cloze context   "{question}\\nAnswer:"                                          (`cloze_context`)
    With `preamble`, `PREAMBLE` comes first (topic: the record's subject with "_" as spaces, else the set's
    name). `chat_wrap` sends a prompt as a user turn through the tokenizer's chat template (with the
    generation prompt); `answer_prefix` is what comes before the answer letter or text: " ", or nothing in
    a chat template's answer turn.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DSGError

LETTERS = "ABCD"
PREAMBLE = "The following are multiple choice questions (with answers) about {topic}.\n\n"
NO_SUBJECT = "(no subject)"


# ------------------------------------------------------------------------------------- sets
@dataclass
class McqSet:
    """Validated multiple-choice questions: records {question, choices [4], answer 0-3, subject|None}."""

    name: str
    role: str  # "forget" or "retain"
    source: str
    records: list
    hub: dict = field(default_factory=dict)  # dataset_id / dataset_config / dataset_split for Hub sources

    @property
    def label(self) -> str:
        """How the set is named in the report: "NAME (ROLE)", or just the role when NAME is the role."""
        return self.role if self.name == self.role else f"{self.name} ({self.role})"

    @property
    def answers(self):
        import numpy as np

        return np.array([r["answer"] for r in self.records], dtype=np.int64)

    @property
    def subjects(self) -> list | None:
        """Per question its subject ("(no subject)" where missing); None if no record has one."""
        if not any(r["subject"] for r in self.records):
            return None
        return [r["subject"] or NO_SUBJECT for r in self.records]


def validate_mcq(records, source: str) -> list[dict]:
    """Check the WMDP/MMLU schema record by record; return clean records (a DSGError names the first problem)."""
    out = []
    for n, r in enumerate(records, 1):
        where = f"{source}: record {n}"
        if not isinstance(r, dict):
            raise DSGError(f"{where} is not a JSON object")
        missing = [k for k in ("question", "choices", "answer") if k not in r]
        if missing:
            raise DSGError(
                f"{where} has no {', '.join(repr(k) for k in missing)} field (the WMDP/MMLU schema is "
                f"question, choices, answer, optional subject; found {', '.join(sorted(map(str, r))) or 'nothing'})"
            )
        question, choices, answer = r["question"], r["choices"], r["answer"]
        if not isinstance(question, str) or not question.strip():
            raise DSGError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(choices, (list, tuple)) or len(choices) != 4:
            got = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
            raise DSGError(f"{where}: 'choices' must be a list of 4 strings, got {got}")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise DSGError(f"{where}: every choice must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= int(answer) <= 3:
            raise DSGError(f"{where}: 'answer' must be the index 0-3 of the correct choice, got {answer!r}")
        subject = r.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise DSGError(f"{where}: 'subject' must be a string")
        out.append({"question": question, "choices": list(choices), "answer": int(answer), "subject": subject or None})
    if not out:
        raise DSGError(f"{source} has no questions")
    return out


def load_mcq(spec: str, role: str, *, name: str | None = None, limit: int | None = None) -> McqSet:
    """Questions from a local .jsonl/.parquet file or a Hub data set `NAME[:CONFIG][@SPLIT]` (split "test")."""
    from .hub import is_repo_id, parse_dataset_spec, require_hub
    from .sources import read_jsonl

    spec = str(spec)
    path = Path(spec).expanduser()
    hub = {}
    if (
        path.suffix.lower() in (".jsonl", ".parquet", ".json", ".txt", ".csv")
        or path.exists()
        or spec.startswith((".", "/", "~"))
    ):
        if path.is_dir():
            raise DSGError(f"--{role}-mcq {spec} is a folder, not a file")
        if not path.is_file():
            raise DSGError(f"--{role}-mcq {spec} " + ("is not a regular file" if path.exists() else "does not exist"))
        if path.suffix.lower() == ".jsonl":
            records = read_jsonl(path)
        elif path.suffix.lower() == ".parquet":
            from .sources import read_parquet

            records = read_parquet(path, spec)
        else:
            raise DSGError(f"--{role}-mcq {spec}: expected a .jsonl or .parquet file (or a Hub data set id)")
        default_name = path.stem
    else:
        parsed = parse_dataset_spec(spec, default_split="test")
        if parsed is None or not is_repo_id(parsed.name):
            raise DSGError(
                f"--{role}-mcq {spec} is not a .jsonl/.parquet file or a Hub data set NAME[:CONFIG][@SPLIT]"
            )
        dataset_id, config, split = parsed
        require_hub(spec, "data set", "pass a local .jsonl or .parquet file")
        import datasets

        try:
            records = datasets.load_dataset(dataset_id, config, split=split).to_list()
        except Exception as err:
            raise DSGError(f"cannot load data set {spec}: {err}") from None
        hub = {"dataset_id": dataset_id, "dataset_split": split, **({"dataset_config": config} if config else {})}
        default_name = config or dataset_id.split("/")[-1]
    if limit is not None:
        records = records[:limit]
    records = validate_mcq(records, spec)
    return McqSet(name=name or default_name, role=role, source=spec, records=records, hub=hub)


def load_text_set(spec: str, *, limit: int | None = None) -> list[str]:
    """Plain texts from any `sources.load_texts` source (the `--text` set of `dsg eval`)."""
    from .sources import load_texts

    return load_texts(str(spec), limit=limit)


# ------------------------------------------------------------------------------------- prompts
def _topic(record: dict, fallback: str) -> str:
    return (record.get("subject") or fallback).replace("_", " ")


def letter_prompt(record: dict, *, preamble: bool = False, topic: str = "") -> str:
    """The lm-eval-harness prompt (question, "A. .." lines, "Answer:"), with the optional preamble."""
    from .sources import mcq_prompt

    text = mcq_prompt(record["question"], record["choices"])
    return (PREAMBLE.format(topic=_topic(record, topic)) + text) if preamble else text


def cloze_context(record: dict, *, preamble: bool = False, topic: str = "") -> str:
    """The cloze context: the question then "Answer:" (no choices listed), with the optional preamble."""
    text = f"{record['question'].strip()}\nAnswer:"
    return (PREAMBLE.format(topic=_topic(record, topic)) + text) if preamble else text


def chat_wrap(tokenizer, text: str) -> str:
    """`text` as a user turn in the tokenizer's chat template, ending with the generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def check_chat(tokenizer) -> None:
    """`DSGError` if `--chat` cannot be used: the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DSGError("--chat: this tokenizer has no chat template")


def answer_prefix(chat: bool) -> str:
    """What comes before the letter or choice text: a space, or nothing in a chat template's answer turn."""
    return "" if chat else " "
