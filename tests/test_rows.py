import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from modeling_dsg.data.rows import Rows, balance, build_rows, split
from modeling_dsg.errors import DSGError

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz .,")


def char_tokenizer(**specials) -> PreTrainedTokenizerFast:
    """One token per character: ids 0-3 are <pad> <s> </s> <unk>, then a..z, space, '.', ','."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    specials = specials or dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


TOK = char_tokenizer()
BOS, EOS, PAD = 1, 2, 0


def doc(letter: str, n: int) -> str:
    return letter * n


def decode_ids(ids) -> str:
    return "".join((SPECIALS + CHARS)[i] for i in ids)


def test_packing_layout_bos_eos_and_row_count():
    docs = [doc("a", 60), doc("b", 70), doc("c", 55)]
    rows = build_rows(docs, TOK, seq_len=16, max_docs=None, seed=0)
    stream_len = 60 + 70 + 55 + 2  # two EOS between three documents
    assert len(rows) == stream_len // 15  # 15 content tokens per row after BOS; partial row dropped
    assert rows.input_ids.shape == (12, 16)
    assert (rows.input_ids[:, 0] == BOS).all()
    assert (rows.attention_mask == 1).all()
    content = rows.input_ids[:, 1:].flatten().tolist()
    assert content.count(EOS) == 2 and BOS not in content
    # The rows are the stream "doc</s>doc</s>doc" (documents in shuffled order) cut every 15 tokens.
    lengths = {"a": 60, "b": 70, "c": 55}
    order = [run[0] for run in decode_ids(content).split("</s>")]
    assert sorted(order) == ["a", "b", "c"]
    stream = "</s>".join(letter * lengths[letter] for letter in order)
    assert decode_ids(content) == stream[: len(stream) - 7]  # 187 tokens = 12 rows of 15 + 7 dropped


def test_short_documents_are_dropped_and_min_chars_is_strict():
    rows = build_rows([doc("a", 50), doc("b", 51), "   " + doc("c", 49) + "   "], TOK, seq_len=8, packing=False)
    assert len(rows) == 1
    assert decode_ids(rows.input_ids[0].tolist()) == "b" * 8
    with pytest.raises(DSGError, match="no document longer than 50 characters"):
        build_rows(["short", doc("a", 50)], TOK)


def test_only_partial_row_is_padded():
    rows = build_rows([doc("a", 51)], TOK, seq_len=100)
    assert rows.input_ids.shape == (1, 100)
    assert rows.attention_mask[0].sum() == 52  # BOS + 51 letters
    assert (rows.input_ids[0, 52:] == PAD).all() and (rows.attention_mask[0, 52:] == 0).all()


def test_unpacked_rows_truncate_and_pad():
    rows = build_rows([doc("a", 60), doc("b", 120)], TOK, seq_len=100, packing=False, max_docs=None)
    by_letter = {decode_ids(r[0:1].tolist()): (r, m) for r, m in zip(rows.input_ids, rows.attention_mask)}
    a_ids, a_mask = by_letter["a"]
    b_ids, b_mask = by_letter["b"]
    assert a_mask.sum() == 60 and (a_ids[60:] == PAD).all() and (a_mask[60:] == 0).all()
    assert b_mask.sum() == 100 and (b_ids == CHARS.index("b") + 4).all()


def bos_adding_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer, but `tokenizer(text)` puts BOS first (as Llama's does)."""
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return tok


@pytest.mark.parametrize("adds_bos", [False, True])
def test_unpacked_rows_are_the_prompts_as_the_guard_sees_them(adds_bos):
    """One row per document is exactly `tokenizer(doc)` cut to seq_len: BOS first only when the tokenizer itself
    adds it, so calibration scores the token sequences the guard scores at run time (a chat-formatted prompt
    gets no BOS in front of its template's first token unless the tokenizer adds one)."""
    tok = bos_adding_tokenizer() if adds_bos else TOK
    docs = [doc("a", 60), "<s>" + doc("b", 70), doc("c", 120)]
    rows = build_rows(docs, tok, seq_len=100, packing=False, max_docs=None)
    expected = sorted(ids[:100] for ids in tok(docs)["input_ids"])
    got = sorted(r[m.bool()].tolist() for r, m in zip(rows.input_ids, rows.attention_mask))
    assert got == expected
    assert sum(row[:2] == [BOS, BOS] for row in got) == (1 if adds_bos else 0)
    assert sum(row[0] == BOS for row in got) == (3 if adds_bos else 1)


def test_max_docs_seeded_and_deterministic():
    docs = [doc(c, 60) for c in "abcdefgh"]
    first = build_rows(docs, TOK, seq_len=64, max_docs=3, packing=False, seed=1)
    again = build_rows(docs, TOK, seq_len=64, max_docs=3, packing=False, seed=1)
    other = build_rows(docs, TOK, seq_len=64, max_docs=3, packing=False, seed=2)
    assert len(first) == 3
    assert torch.equal(first.input_ids, again.input_ids)

    def letters(rows):
        return [decode_ids([int(i)]) for i in rows.input_ids[:, 0]]

    assert len(set(letters(first))) == 3
    assert letters(first) != letters(other)


def test_tokenizer_without_bos_or_pad():
    tok = char_tokenizer(eos_token="</s>")
    rows = build_rows([doc("a", 60), doc("b", 60)], tok, seq_len=11, max_docs=None)
    assert len(rows) == 121 // 11  # no BOS: all 11 positions are content
    assert BOS not in rows.input_ids.flatten().tolist()
    padded = build_rows([doc("a", 60)], tok, seq_len=64, packing=False)
    assert (padded.input_ids[0, 60:] == EOS).all()  # pad falls back to EOS
    assert padded.attention_mask[0].sum() == 60


def test_bad_arguments():
    with pytest.raises(DSGError, match="seq_len"):
        build_rows([doc("a", 60)], TOK, seq_len=1)
    with pytest.raises(DSGError, match="max_docs"):
        build_rows([doc("a", 60)], TOK, max_docs=0)
    with pytest.raises(DSGError, match="EOS"):
        build_rows([doc("a", 60)], char_tokenizer(bos_token="<s>"), seq_len=8)


def numbered(n: int) -> Rows:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return Rows(ids, torch.ones_like(ids))


def test_balance_gives_equal_counts_seeded():
    forget, retain = numbered(10), numbered(4)
    f, r = balance(forget, retain, seed=3)
    assert len(f) == len(r) == 4
    assert r is retain
    kept = f.input_ids[:, 0].tolist()
    assert kept == sorted(kept) and len(set(kept)) == 4
    assert balance(forget, retain, seed=3)[0].input_ids.equal(f.input_ids)
    r2, f2 = balance(retain, forget, seed=3)
    assert len(r2) == len(f2) == 4
    with pytest.raises(DSGError, match="empty"):
        balance(numbered(0), retain)


def test_split_is_seeded_and_disjoint():
    rows = numbered(10)
    train, held = split(rows, 0.3, seed=5)
    assert len(train) == 7 and len(held) == 3
    assert sorted(train.input_ids[:, 0].tolist() + held.input_ids[:, 0].tolist()) == list(range(10))
    assert split(rows, 0.3, seed=5)[1].input_ids.equal(held.input_ids)
    assert len(split(rows, 0.0)[1]) == 0
    assert len(split(numbered(3), 0.01)[1]) == 1  # a positive fraction holds out at least one row
    with pytest.raises(DSGError):
        split(rows, 1.0)
    with pytest.raises(DSGError):
        split(numbered(1), 0.5)
