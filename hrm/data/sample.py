"""The unit of training data: one tokenized (instruction, response) pair."""

from __future__ import annotations

from dataclasses import dataclass

from hrm.data.tokenizer import Tokenizer
from hrm.errors import DataError


@dataclass(frozen=True)
class Sample:
    """Token ids of one pair.

    ``instruction`` is the whole prefix, framing included (``[boi] ... [eoi]`` for our
    tokenizers); ``response`` is the supervised part and normally ends with ``eoa``. Both
    are non-empty: the last instruction token predicts ``response[0]``. Packed, a sample
    occupies ``len(instruction) + len(response) - 1`` tokens (see :attr:`packed_len`).
    """

    instruction: list[int]
    response: list[int]

    def __post_init__(self) -> None:
        if not self.instruction:
            raise DataError("sample has an empty instruction")
        if not self.response:
            raise DataError("sample has an empty response")

    @property
    def packed_len(self) -> int:
        """Tokens the sample takes in a packed row: ``inst ++ resp[:-1]``."""
        return len(self.instruction) + len(self.response) - 1


def encode_pair(tokenizer: Tokenizer, instruction: str, response: str) -> Sample:
    """Encode texts as ``Sample(encode_instruction(instruction), encode_response(response))``."""
    return Sample(tokenizer.encode_instruction(instruction), tokenizer.encode_response(response))
