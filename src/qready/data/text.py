"""``text``: a file of lines, tokenized by a Hugging Face tokenizer, no labels.

For label-free fine-tuning and calibration of a pretrained language model: ``root`` is a UTF-8 text
file, one sample per non-blank line. The lines are split **by line** (seeded) into a fine-tuning set
and a held-out evaluation set and tokenized once with ``tokenizer`` — a tokenizer object (anything
called as ``tokenizer(lines, truncation=True, max_length=L)`` returning ``input_ids``, e.g. a
``transformers`` fast tokenizer) or the path of a local tokenizer directory (loaded with
``AutoTokenizer.from_pretrained(path, local_files_only=True)``: nothing is downloaded). Sequences are
truncated and right-padded to ``max_length`` tokens with the tokenizer's pad token (its end-of-text
token, or 0, when it has none; padded positions have ``attention_mask`` 0).

Items are dicts ``{"input_ids": int64 [L], "attention_mask": int64 [L]}``, so a ``DataLoader`` yields
batches ``{"input_ids": [B, L], "attention_mask": [B, L]}`` of model keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..checks import check_float, check_int
from .registry import DATASETS, DatasetSplits, split_seeded


class TokenizedLines(Dataset):
    """Padded token ids and attention masks, ``[N, L]`` int64 each; item ``i`` is the dict of row ``i``."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}


def load_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` itself when it is callable, else the tokenizer saved in the local directory it names."""
    if callable(tokenizer):
        return tokenizer
    if not isinstance(tokenizer, (str, Path)):
        raise ValueError(f"option 'tokenizer' must be a tokenizer object or a local tokenizer directory; "
                         f"got {tokenizer!r}")
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise FileNotFoundError(f"option 'tokenizer': {folder} is not a directory (save one with "
                                "tokenizer.save_pretrained(DIR))")
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError("a tokenizer directory needs Hugging Face transformers: pip install 'qready[hf]'") from err
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def tokenize(lines: list[str], tokenizer: Any, max_length: int) -> TokenizedLines:
    """Tokenize ``lines`` (truncated to ``max_length`` tokens) and right-pad them into :class:`TokenizedLines`."""
    encoded = tokenizer(lines, truncation=True, max_length=max_length)
    ids_list = encoded["input_ids"]
    ids = torch.full((len(lines), max_length), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(lines), max_length), dtype=torch.long)
    for row, seq in enumerate(ids_list):
        seq = list(seq)[:max_length]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return TokenizedLines(ids, mask)


@DATASETS.register("text")
def text(*, root: str | None = None, seed: int = 0, tokenizer: Any = None, max_length: int = 128,
         test_fraction: float = 0.2) -> DatasetSplits:
    """Lines of the text file ``root`` tokenized by ``tokenizer`` (object or local directory), split by
    line (``test_fraction`` held out, seeded); items are dicts of ``max_length`` token ids and mask.
    ``num_classes`` is 0: there are no labels."""
    if root is None:
        raise FileNotFoundError("dataset 'text' reads a text file: pass root=FILE (one sample per line)")
    file = Path(root)
    if not file.is_file():
        raise FileNotFoundError(f"text: {file} is not a file")
    if tokenizer is None:
        raise ValueError("dataset 'text' needs option 'tokenizer': a Hugging Face tokenizer object or the path "
                         "of a local tokenizer directory")
    max_length = check_int("max_length", max_length, minimum=1)
    test_fraction = check_float("test_fraction", test_fraction, minimum=0.0, maximum=1.0, exclusive=True)
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, test = split_seeded(lines, test_fraction, seed, what=f"non-blank lines in {file}")
    tok = load_tokenizer(tokenizer)
    return DatasetSplits(
        train=tokenize(train, tok, max_length), test=tokenize(test, tok, max_length),
        num_classes=0, input_shape=(max_length,), name="text",
    )
