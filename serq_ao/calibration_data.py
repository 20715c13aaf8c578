"""Calibration windows from the user's own data: a text file, or a local dataset.

Tokenized as the protocol tokenizes its corpora (:mod:`serq_ao.data`: no special tokens, the
tokenizer's BOS put in front of each window), sampled with a seed:

- a text file is one document: ``samples`` windows of ``seqlen`` tokens, picked at random
  (without repeats) among its consecutive non-overlapping windows;
- a dataset (a ``datasets`` folder saved with ``save_to_disk``, an Arrow file, or JSON
  Lines) is a set of documents, one per row of ``column``: ``samples`` rows picked at random
  among those with any tokens, each truncated to ``seqlen`` tokens, so windows may be shorter
  (the engine runs each alone; nothing is padded).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from serq_ao.data import add_bos, cut_windows, tokenize

DEFAULT_SEED = 0
DEFAULT_COLUMN = "text"


def text_calibration(tokenizer, text: str, samples: int, seqlen: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """(samples, seqlen [+ 1 for BOS]) windows of ``text``, picked at random with ``seed``."""
    if seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen}")
    tokens = tokenize(tokenizer, text)
    available = tokens.numel() // seqlen
    if not 1 <= samples <= available:
        raise ValueError(f"samples must be in [1, {available}]: the text has {tokens.numel()} tokens, "
                         f"{available} windows of {seqlen}; got {samples}")
    windows = cut_windows(tokens, seqlen)
    picked = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return add_bos(windows[picked], tokenizer)


def read_text_file(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_documents(path: str | os.PathLike, column: str = DEFAULT_COLUMN, split: str = "train") -> list[str]:
    """The ``column`` of a local dataset: a ``save_to_disk`` folder (a DatasetDict's ``split``),
    an ``.arrow`` file, or ``.jsonl`` / ``.json`` lines."""
    import datasets

    path = Path(path)
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{path} is not a dataset saved with save_to_disk ({' '.join(str(e).split())[:160]})") \
                from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path} holds the splits {sorted(data)}, not {split!r}")
            data = data[split]
    elif path.suffix == ".arrow":
        data = datasets.Dataset.from_file(str(path))
    elif path.suffix in (".jsonl", ".json"):
        data = datasets.load_dataset("json", data_files=str(path), split="train")
    elif not path.exists():
        raise ValueError(f"{path}: no such dataset")
    else:
        raise ValueError(f"{path}: a dataset must be a save_to_disk folder, an .arrow file or .jsonl lines")
    if column not in data.column_names:
        raise ValueError(f"{path} has no column {column!r}; its columns: {', '.join(data.column_names)}")
    values = data[column]
    if values and not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values if not isinstance(v, str)})
        raise ValueError(f"column {column!r} of {path} must hold text, found {', '.join(kinds)}")
    return list(values)


def document_calibration(tokenizer, documents: list[str], samples: int, seqlen: int,
                         seed: int = DEFAULT_SEED) -> list[torch.Tensor]:
    """``samples`` documents picked at random with ``seed`` among those with any tokens, each
    its first ``seqlen`` tokens with BOS in front: windows (1, L_i), L_i <= seqlen [+ 1]."""
    if seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen}")
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    windows = []
    for index in torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist():
        tokens = tokenize(tokenizer, documents[index])[:seqlen]
        if tokens.numel():
            windows.append(add_bos(tokens[None], tokenizer))
            if len(windows) == samples:
                return windows
    raise ValueError(f"samples must be at most {len(windows)}: only {len(windows)} of the {len(documents)} documents "
                     f"have any tokens; got {samples}")
