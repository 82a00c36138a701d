"""Tokenizers: the built-in byte tokenizer and a wrapper around Hugging Face ``tokenizers``.

Every tokenizer exposes the same interface (:class:`Tokenizer`): plain ``encode`` /
``decode`` plus the framing used by the training objective, where an instruction is
``[boi] + tokens + [eoi]`` and a response is ``tokens + [eoa]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from hrm.errors import DataError

#: Names of the special tokens an :class:`HFTokenizer` looks up (or adds) in its vocab.
HF_SPECIAL_TOKENS = {"pad": "<|pad|>", "boi": "<|boi|>", "eoi": "<|eoi|>", "eoa": "<|eoa|>"}


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    pad_id: int
    boi_id: int
    eoi_id: int
    eoa_id: int

    @property
    def vocab_size(self) -> int: ...

    @property
    def spec(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_instruction(self, text: str) -> list[int]: ...

    def encode_response(self, text: str) -> list[int]: ...


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"text is not encodable as UTF-8 ({e.reason} at character {e.start})") from None


class ByteTokenizer:
    """UTF-8 bytes as tokens.

    Ids ``0..255`` are the bytes; ``256`` pad, ``257`` begin of instruction, ``258`` end of
    instruction, ``259`` end of answer; ``vocab_size`` is 260.
    """

    pad_id = 256
    boi_id = 257
    eoi_id = 258
    eoa_id = 259

    @property
    def vocab_size(self) -> int:
        return 260

    @property
    def spec(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``, no special tokens."""
        return list(_utf8(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text from byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_instruction(self, text: str) -> list[int]:
        """``[boi] + encode(text) + [eoi]``."""
        return [self.boi_id, *self.encode(text), self.eoi_id]

    def encode_response(self, text: str) -> list[int]:
        """``encode(text) + [eoa]``."""
        return [*self.encode(text), self.eoa_id]

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` with the pipeline's special tokens.

    The tokens named in :data:`HF_SPECIAL_TOKENS` are looked up in the vocab and added as
    special tokens when absent, so ``vocab_size`` (including added tokens) may exceed the
    file's own vocab. ``encode`` never produces special ids: a special token's name inside
    the text is tokenized as ordinary text, as with the byte tokenizer.
    """

    def __init__(self, path: str | Path):
        try:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise DataError(
                "the Hugging Face tokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from None
        self._path = str(path)
        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            self._tok = _HFTokenizer.from_file(self._path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
        self._tok.encode_special_tokens = True  # special-token strings in text stay plain text
        missing = [name for name in HF_SPECIAL_TOKENS.values() if self._tok.token_to_id(name) is None]
        if missing:
            self._tok.add_special_tokens([AddedToken(name, special=True) for name in missing])
        ids = {key: self._tok.token_to_id(name) for key, name in HF_SPECIAL_TOKENS.items()}
        self.pad_id, self.boi_id, self.eoi_id, self.eoa_id = (ids["pad"], ids["boi"], ids["eoi"], ids["eoa"])
        self._special = frozenset(ids.values())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def spec(self) -> str:
        return self._path

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any template or special tokens."""
        _utf8(text)  # the same error as the byte tokenizer for unencodable text
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text from ids; the pipeline's special ids (and other special tokens) are dropped."""
        kept = [int(i) for i in ids]
        return self._tok.decode([i for i in kept if i not in self._special], skip_special_tokens=True)

    def encode_instruction(self, text: str) -> list[int]:
        """``[boi] + encode(text) + [eoi]``."""
        return [self.boi_id, *self.encode(text), self.eoi_id]

    def encode_response(self, text: str) -> list[int]:
        """``encode(text) + [eoa]``."""
        return [*self.encode(text), self.eoa_id]

    def __repr__(self) -> str:
        return f"HFTokenizer({self._path!r})"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which ``tokenizers``' ByteLevel steps use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def hf_tokenizer_json(tokenizer: ByteTokenizer | HFTokenizer) -> dict:
    """``tokenizer`` as a Hugging Face ``tokenizer.json`` document that gives the same ids,
    special tokens included. The byte tokenizer becomes a byte-level BPE without merges (each
    UTF-8 byte its own token, ids ``0..255``); a :class:`HFTokenizer` is its own file with the
    special tokens it added. Needs no ``tokenizers`` package for the byte tokenizer."""
    import json

    if isinstance(tokenizer, HFTokenizer):
        return json.loads(tokenizer._tok.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    specials = {tokenizer.pad_id: "pad", tokenizer.boi_id: "boi", tokenizer.eoi_id: "eoi", tokenizer.eoa_id: "eoa"}
    added = [
        {
            "id": i,
            "content": HF_SPECIAL_TOKENS[name],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in sorted(specials.items())
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {char: b for b, char in sorted(_bytes_to_unicode().items())},
            "merges": [],
        },
    }


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` gives a :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json``."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise DataError(f"{spec}: tokenizer file not found (use 'byte' or a path to tokenizer.json)")
    return HFTokenizer(spec)
