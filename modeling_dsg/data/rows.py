"""Corpora to token rows: the fixed-length sequences that statistics and calibration run on.

The defaults are the paper's (Muhamed et al., Dynamic SAE Guardrails):

- keep documents with more than 50 characters (`min_chars=50`),
- shuffle them with a fixed seed and keep up to 1024 (`max_docs=1024`),
- join them with EOS into one token stream and cut it into rows of 1024 tokens (`seq_len=1024`)
  with BOS at position 0 (`packing=True`),
- give the forget and the retain corpus the same number of rows (`balance`).

`packing=False` instead makes one row per document, which suits short records such as multiple-choice
questions, where a row should be one question. The row is the document's first tokens exactly as the guard sees
the document as a prompt, `tokenizer(doc)` with the tokenizer's own special tokens, right-padded: a tokenizer that
adds BOS (Llama) starts the row with it and one that does not (SmolLM2, Qwen) does not. So calibration measures
the very token sequences the guard will score, and a chat-formatted document keeps its template's own first token.

A packed row starts with BOS whenever the tokenizer has one (a row cut from the middle of a stream has no prompt
to match); a tokenizer without a BOS token gets packed rows whose every position holds content.
Padding uses `tokenizer.pad_token_id`, else the EOS id, else 0; padded positions always have
`attention_mask == 0`, so their id never matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DSGError

# The row options that `dsg build` and `dsg rmu` share (fields of BuildOptions and RMUOptions), described once.
ROW_HELP = {
    "seq_len": "tokens per row",
    "min_chars": "documents of this many characters or fewer are dropped",
    "max_docs": "documents used per corpus, at most",
    "packing": "one document per row instead of EOS-joined chunks",
    "seed": "seed of every sampling step",
}


def row_option_checks(options, flags: bool = True) -> list[tuple[bool, str]]:
    """(ok, message) for the row options of `options`; `flags`: name them as command-line flags."""

    def name(field: str) -> str:
        return "--" + field.replace("_", "-") if flags else field

    return [
        (options.seq_len >= 2, f"{name('seq_len')} must be at least 2, got {options.seq_len}"),
        (
            options.max_docs is None or options.max_docs >= 1,
            f"{name('max_docs')} must be at least 1, got {options.max_docs}",
        ),
    ]


@dataclass
class Rows:
    """A batch of token rows.

    input_ids: [R, T] token ids. attention_mask: [R, T], 1 for a real token and 0 for padding.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def select(self, index: torch.Tensor) -> Rows:
        """The rows at `index` (a 1-D index tensor), in that order."""
        return Rows(self.input_ids[index], self.attention_mask[index])

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], pad_id: int) -> Rows:
        """Token id sequences as right-padded rows (padded with `pad_id`, masked out)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return cls(ids, mask)


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def build_rows(
    texts: list[str],
    tokenizer,
    *,
    seq_len: int = 1024,
    min_chars: int = 50,
    max_docs: int | None = 1024,
    packing: bool = True,
    seed: int = 0,
) -> Rows:
    """Tokenize a corpus into rows of `seq_len` tokens.

    1. Keep documents with more than `min_chars` characters (after stripping surrounding whitespace).
    2. Shuffle them with `seed` and keep the first `max_docs` (`None` keeps all).
    3. Tokenize each document without special tokens, then
       - `packing=True`: concatenate the documents with one EOS between neighbours, and cut the stream
         into rows of `seq_len` tokens, each starting with BOS: `seq_len - 1` content tokens per row.
         The last, partial row is dropped unless it is the only row; then it is right-padded.
       - `packing=False`: one row per document, the first `seq_len` tokens of `tokenizer(doc)` (the tokenizer's
         own special tokens, as the guard sees the document as a prompt), right-padded to `seq_len`.

    Without a BOS token packed rows carry `seq_len` content tokens and no BOS.
    Raises DSGError for an empty result or bad arguments.
    """
    if seq_len < 2:
        raise DSGError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if max_docs is not None and max_docs < 1:
        raise DSGError(f"max_docs must be at least 1 (or None for all documents), got {max_docs}")

    docs = [t for t in texts if isinstance(t, str) and len(t.strip()) > min_chars]
    if not docs:
        raise DSGError(f"the corpus has no document longer than {min_chars} characters ({len(texts)} documents given)")
    order = _permutation(len(docs), seed).tolist()
    if max_docs is not None:
        order = order[:max_docs]
    docs = [docs[i] for i in order]
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    bos: list[int] = []
    if packing:
        token_lists = tokenizer(docs, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        content_len = seq_len - len(bos)
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise DSGError("packing joins documents with EOS, but the tokenizer has no EOS token; use packing=False")
        stream: list[int] = []
        for i, ids in enumerate(token_lists):
            if i:
                stream.append(eos_id)
            stream.extend(ids)
        n_full = len(stream) // content_len
        chunks = [stream[i * content_len : (i + 1) * content_len] for i in range(n_full)] or [stream]
    else:  # each prompt as the guard sees it
        chunks = [ids[:seq_len] for ids in tokenizer(docs)["input_ids"]]

    input_ids = torch.full((len(chunks), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunks), seq_len), dtype=torch.long)
    for r, chunk in enumerate(chunks):
        row = bos + chunk
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
    return Rows(input_ids, attention_mask)


def balance(forget: Rows, retain: Rows, seed: int = 0) -> tuple[Rows, Rows]:
    """Equal row counts, as in the paper: a seeded random subset of the larger set's rows (kept in
    their original order) of the smaller set's size. The smaller set is returned unchanged."""
    if len(forget) == 0 or len(retain) == 0:
        raise DSGError(f"cannot balance an empty row set (forget {len(forget)} rows, retain {len(retain)} rows)")
    n = min(len(forget), len(retain))

    def subsample(rows: Rows) -> Rows:
        if len(rows) == n:
            return rows
        return rows.select(_permutation(len(rows), seed)[:n].sort().values)

    return subsample(forget), subsample(retain)


def split(rows: Rows, heldout_fraction: float, seed: int = 0) -> tuple[Rows, Rows]:
    """A seeded random split into (train, heldout); each keeps the original row order.

    The heldout part has round(heldout_fraction * R) rows, at least 1 when heldout_fraction > 0, and
    the train part keeps at least 1 row. heldout_fraction must be in [0, 1).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise DSGError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n = len(rows)
    if heldout_fraction > 0 and n < 2:
        raise DSGError(f"need at least 2 rows to hold some out, got {n}")
    n_held = round(heldout_fraction * n)
    if heldout_fraction > 0:
        n_held = min(max(n_held, 1), n - 1)
    perm = _permutation(n, seed)
    held, train = perm[:n_held].sort().values, perm[n_held:].sort().values
    return rows.select(train), rows.select(held)
