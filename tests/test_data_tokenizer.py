"""Tokenizers: byte tokenizer framing and round trip, the Hugging Face wrapper, load_tokenizer."""

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrm.data import ByteTokenizer, HFTokenizer, Sample, encode_pair, load_tokenizer
from hrm.errors import DataError


@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_instruction(text)) == text
    assert tok.decode(tok.encode_response(text)) == text


def test_byte_framing_and_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.boi_id, tok.eoi_id, tok.eoa_id, tok.vocab_size) == (256, 257, 258, 259, 260)
    assert tok.spec == "byte"
    assert tok.encode_instruction("ab") == [257, 97, 98, 258]
    assert tok.encode_response("é") == [0xC3, 0xA9, 259]
    assert tok.decode([256, 104, 257, 105, 258, 259]) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"  # truncated UTF-8 is replaced, not an error


def test_byte_unencodable_text():
    with pytest.raises(DataError, match="not encodable as UTF-8"):
        ByteTokenizer().encode("a\ud800")


def test_encode_pair_and_sample_validation():
    sample = encode_pair(ByteTokenizer(), "q", "a")
    assert sample == Sample([257, 113, 258], [97, 259])
    assert sample.packed_len == 4
    with pytest.raises(DataError, match="empty instruction"):
        Sample([], [1])
    with pytest.raises(DataError, match="empty response"):
        Sample([1], [])


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|pad|>"],
        show_progress=False,
    )
    tok.train_from_iterator(["hello world", "the quick brown fox", "12+34=46"] * 5, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer(hf_tokenizer_file):
    tok = load_tokenizer(str(hf_tokenizer_file))
    assert isinstance(tok, HFTokenizer)
    assert tok.spec == str(hf_tokenizer_file)
    assert tok.pad_id == 0  # already in the vocab: looked up, not added
    specials = {tok.boi_id, tok.eoi_id, tok.eoa_id}
    assert len(specials) == 3 and min(specials) >= 256
    assert tok.vocab_size == max(specials) + 1
    for text in ["hello world", "héllo wörld ✓ <|eoa|>", "", "12+34"]:
        inst = tok.encode_instruction(text)
        assert inst[0] == tok.boi_id and inst[-1] == tok.eoi_id
        assert inst[1:-1] == tok.encode(text)
        resp = tok.encode_response(text)
        assert resp[-1] == tok.eoa_id
        assert tok.decode(inst) == text
        assert tok.decode(resp + [tok.pad_id]) == text
        assert not set(tok.encode(text)) & {tok.pad_id, *specials}  # names in text stay text


def test_hf_tokenizer_errors(tmp_path, monkeypatch):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        HFTokenizer(bad)
    with pytest.raises(DataError, match="tokenizer file not found"):
        HFTokenizer(tmp_path / "missing.json")
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(DataError, match="pip install tokenizers"):
        HFTokenizer(bad)


def test_load_byte():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
