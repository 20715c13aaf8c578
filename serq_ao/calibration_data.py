"""Calibration windows from the user's own data: a text file, or a local dataset.

Tokenized as the protocol tokenizes its corpora (:mod:`serq_ao.data`: no special tokens, the
tokenizer's BOS put in front of each window), sampled with a seed:

- a text file is one document: ``samples`` windows of ``seqlen`` tokens, picked at random
  (without repeats) among its consecutive non-overlapping windows;
- a dataset (a ``datasets`` folder saved with ``save_to_disk``, an Arrow file, or JSON
  Lines) is a set of documents, one per row of ``column``: ``samples`` rows picked at random
  among those with any tokens, each truncated to ``seqlen`` tokens, so windows may be shorter
  (the engine runs each alone; nothing is padded).

Memory follows the tokens used, not the size of the data (a tokenizer's output costs up to
~200 bytes per token, so tokenizing a 20 MB file at once took 5 GB):

- a text is tokenized in pieces of at most :data:`TEXT_PIECE` units (bytes of a file,
  characters of a string) to count its windows, and again only the pieces the picked windows
  lie in. A text of at most one piece (256 KiB) is tokenized whole, as it always was. Longer
  texts are cut at a single space or line break between two non-spaces (:func:`_cut`): a
  point where byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM) split anyway, so their
  windows are the same as from tokenizing the whole text (SmolLM2's tokenizer: the same
  tokens for the wiki and bbc calibration texts cut every 4 KiB or 64 KiB). A tokenizer that
  merges across spaces (SentencePiece without a pre-tokenizer, e.g. Llama 2's) may tokenize
  the text next to a cut differently: windows are still the file's text, though not
  necessarily the ones tokenizing it whole would give;
- a dataset's rows are read when picked (a JSON Lines file keeps only where each row starts),
  and of a picked row only a prefix is tokenized (:func:`first_tokens`).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch

from serq_ao.data import add_bos, tokenize
from serq_ao.messages import one_line

DEFAULT_SEED = 0
DEFAULT_COLUMN = "text"
TEXT_PIECE = 1 << 18
# first_tokens: characters tried per token wanted (prose averages 3-5 per token), and the
# tokens wanted beyond seqlen so that the cut, which changes only the tokens near it, is
# far from the ones kept
ROW_CHARS_PER_TOKEN = 8
ROW_SPARE_TOKENS = 16


# --- text: one document, windows among its consecutive windows -------------------------------


class _Text:
    """A text read in pieces: ``pieces`` (start, length) in units of ``read``."""

    def __init__(self, name: str, size: int, read):
        self.name, self.size, self.read = name, size, read

    def pieces(self):
        """(start, length) of consecutive pieces of at most TEXT_PIECE units covering the text."""
        start = 0
        while start < self.size:
            if self.size - start <= TEXT_PIECE:
                yield start, self.size - start
                return
            buffer = self.read(start, TEXT_PIECE + 1, raw=True)  # one unit past: what follows a cut
            length = _cut(buffer, TEXT_PIECE)
            yield start, length
            start += length


def _cut(buffer, limit: int) -> int:
    """Where to end a piece of ``buffer`` (str or bytes, longer than ``limit``), in
    (limit / 2, limit]: before the last space or line break that has a non-space on both sides
    (byte-level BPE pre-tokenizers end a word there and start the next with that space, so a
    piece tokenizes as it would inside the whole text; a cut inside a run of spaces would not),
    else at a character boundary (not inside a UTF-8 sequence or \\r\\n)."""
    low = limit // 2
    for mark in ((" ", "\n") if isinstance(buffer, str) else (b" ", b"\n")):
        at = buffer.rfind(mark, low + 1, limit)
        while at > low:
            if not (buffer[at - 1:at].isspace() or buffer[at + 1:at + 2].isspace()):
                return at if mark in (" ", b" ") else at + 1
            at = buffer.rfind(mark, low + 1, at)
    at = limit
    if isinstance(buffer, bytes):
        while at > low and buffer[at] & 0xC0 == 0x80:  # a UTF-8 continuation byte
            at -= 1
    return at - 1 if buffer[at - 1:at] in ("\r", b"\r") else at


def _string_text(text: str) -> _Text:
    return _Text("the text", len(text), lambda start, length, raw=False: text[start:start + length])


def _file_text(path: Path) -> _Text:
    def read(start: int, length: int, raw: bool = False):
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(length)
        if raw:
            return data
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {start + e.start})") from None
        # universal newlines, as reading the file in text mode gives
        return text.replace("\r\n", "\n").replace("\r", "\n")

    return _Text(str(path), path.stat().st_size, read)


def _check_text_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a text file")
    if path.exists() and not path.is_file():  # a device or a pipe: no size, no seeking
        raise ValueError(f"{path} is not a regular file")
    if not path.is_file():
        raise ValueError(f"{path}: no such text file")
    return path


def text_calibration(tokenizer, text: str, samples: int, seqlen: int, seed: int = DEFAULT_SEED, *,
                     samples_option: str = "samples", seqlen_option: str = "seqlen") -> torch.Tensor:
    """(samples, seqlen [+ 1 for BOS]) windows of ``text``, picked at random with ``seed``.
    ``samples_option`` and ``seqlen_option``: the names errors give the two numbers."""
    return _windows(tokenizer, _string_text(text), samples, seqlen, seed, samples_option, seqlen_option)


def text_file_calibration(tokenizer, path: str | os.PathLike, samples: int, seqlen: int, seed: int = DEFAULT_SEED,
                          *, samples_option: str = "samples", seqlen_option: str = "seqlen") -> torch.Tensor:
    """:func:`text_calibration` of a UTF-8 text file, read and tokenized piece by piece."""
    text = _file_text(_check_text_file(path))
    return _windows(tokenizer, text, samples, seqlen, seed, samples_option, seqlen_option)


def _windows(tokenizer, text: _Text, samples: int, seqlen: int, seed: int, samples_option: str,
             seqlen_option: str) -> torch.Tensor:
    if seqlen < 1:
        raise ValueError(f"{seqlen_option} must be a positive integer, got {seqlen}")
    pieces, cache = [], {}  # cache: tokens of the pieces the current window lies in
    for start, length in text.pieces():
        tokens = tokenize(tokenizer, text.read(start, length))
        pieces.append((start, length, tokens.numel()))
        cache = {0: tokens} if len(pieces) == 1 else {}  # a text of one piece is tokenized once
    total = sum(count for _, _, count in pieces)
    available = total // seqlen
    if available == 0:
        what = "is empty" if text.size == 0 else f"has {total} tokens"
        raise ValueError(f"{text.name} {what}: one window of {seqlen_option} {seqlen} needs {seqlen} tokens")
    if not 1 <= samples <= available:
        raise ValueError(f"{samples_option} must be in [1, {available}]: {text.name} has {total} tokens, "
                         f"{available} windows of {seqlen}; got {samples}")
    picked = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    firsts = [0]  # token index each piece starts at
    for _, _, count in pieces:
        firsts.append(firsts[-1] + count)

    def tokens_of(index: int) -> torch.Tensor:
        if index not in cache:
            start, length, count = pieces[index]
            cache[index] = tokenize(tokenizer, text.read(start, length))
            if cache[index].numel() != count:
                raise ValueError(f"a piece of {text.name} gave {cache[index].numel()} tokens, {count} when "
                                   "first read: the file changed meanwhile, or the tokenizer is not deterministic")
        return cache[index]

    windows = {}
    piece = 0
    for window in sorted(picked):  # in the text's order: each piece is tokenized once more at most
        first, last = window * seqlen, (window + 1) * seqlen
        while firsts[piece + 1] <= first:
            piece += 1
        for stale in [i for i in cache if i < piece]:
            del cache[stale]
        parts, at = [], piece
        while firsts[at] < last:
            tokens = tokens_of(at)
            parts.append(tokens[max(first - firsts[at], 0):last - firsts[at]])
            at += 1
        windows[window] = torch.cat(parts)
    return add_bos(torch.stack([windows[w] for w in picked]), tokenizer)


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file, whole (for texts that fit in memory; :func:`text_file_calibration`
    reads a calibration file piece by piece)."""
    path = _check_text_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


# --- datasets: documents, one window from each picked row ---------------------------------------


class _JsonLinesColumn(Sequence):
    """One column of a JSON Lines file: the text of a row is read when asked for; only where
    each row starts is kept."""

    def __init__(self, path: Path, column: str, starts: array):
        self.path, self.column, self.starts = path, column, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(self.starts[index])
            return json.loads(f.readline().decode("utf-8-sig"))[self.column]


class _ArrowColumn(Sequence):
    """One column of a ``datasets.Dataset`` (memory-mapped), a row read when asked for."""

    def __init__(self, data, column: str):
        self.data, self.column = data.select_columns([column]), column

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.data[index][self.column]


def load_documents(path: str | os.PathLike, column: str = DEFAULT_COLUMN, split: str = "train") -> Sequence[str]:
    """The ``column`` of a local dataset: a ``save_to_disk`` folder (a DatasetDict's ``split``),
    an ``.arrow`` file, or ``.jsonl`` / ``.json`` lines (a ``.json`` file may also hold one
    list of objects). A sequence of its texts, each read when asked for; every row is checked
    here, and a fault is one error naming the file (and the line of a JSON Lines file)."""
    path = Path(path)
    if path.is_dir():
        return _saved_dataset(path, column, split)
    if not path.exists():
        raise ValueError(f"{path}: no such dataset")
    if path.suffix == ".arrow":
        import datasets

        try:
            data = datasets.Dataset.from_file(str(path))
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path} is not a readable Arrow file ({one_line(e)})") from None
        return _arrow_column(data, column, path)
    if path.suffix in (".jsonl", ".json"):
        return _json_documents(path, column)
    raise ValueError(f"{path}: a dataset must be a save_to_disk folder, an .arrow file or .jsonl lines")


def _saved_dataset(path: Path, column: str, split: str) -> Sequence[str]:
    import datasets

    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise ValueError(f"{path} is a folder but not a dataset saved with save_to_disk (it has no state.json "
                         "or dataset_dict.json)")
    try:
        data = datasets.load_from_disk(str(path))
    # missing or damaged files (ArrowInvalid is a ValueError); datasets fails on a folder of no
    # rows (state.json lists no data files) with an IndexError
    except (OSError, ValueError, KeyError, IndexError) as e:
        if isinstance(e, IndexError) and _lists_no_files(path / "state.json"):
            raise ValueError(f"{path} has no rows") from None
        raise ValueError(f"{path} is not a readable dataset saved with save_to_disk ({one_line(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path} holds the splits {sorted(data)}, not {split!r}")
        data = data[split]
    return _arrow_column(data, column, path)


def _lists_no_files(state: Path) -> bool:
    try:
        return json.loads(state.read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _arrow_column(data, column: str, path: Path) -> Sequence[str]:
    if column not in data.column_names:
        raise ValueError(f"{path} has no column {column!r}; its columns: {', '.join(data.column_names)}")
    feature = data.features[column]
    dtype = getattr(feature, "dtype", type(feature).__name__)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"column {column!r} of {path} must hold text, found {dtype}")
    if len(data) == 0:
        raise ValueError(f"{path} has no rows")
    nulls = data.data.column(column).null_count
    if nulls:
        raise ValueError(f"column {column!r} of {path} must hold text, found null in {nulls} of its {len(data)} rows")
    return _ArrowColumn(data, column)


def _json_documents(path: Path, column: str) -> Sequence[str]:
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: a dataset needs rows (one JSON object per line)")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix == ".json" and head.startswith(b"["):
        return _json_list(path, column)  # one JSON document: a list of rows, read whole
    starts = array("q")
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            if line.strip():
                _row_text(line, column, path, number)
                starts.append(offset)
            offset += len(line)
    if not starts:
        raise ValueError(f"{path} has only blank lines: a dataset needs rows (one JSON object per line)")
    return _JsonLinesColumn(path, column, starts)


def _row_text(line: bytes, column: str, path: Path, number: int) -> str:
    where = f"{path} line {number}"
    try:
        row = json.loads(line.decode("utf-8-sig"))  # a byte order mark may open the file
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON: {e.msg} (column {e.colno}); JSON Lines hold one object a line") \
            from None
    return _value(row, column, where, path)


def _value(row, column: str, where: str, path: Path) -> str:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object with a {column!r} field")
    if column not in row:
        raise ValueError(f"{where} has no column {column!r}; its columns: {', '.join(map(str, row))}")
    value = row[column]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"column {column!r} of {path} must hold text, found {kind} ({where})")
    return value


def _json_list(path: Path, column: str) -> list[str]:
    try:
        rows = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} must hold JSON Lines or a non-empty list of objects")
    return [_value(row, column, f"{path} row {index}", path) for index, row in enumerate(rows)]


def first_tokens(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    """The first ``seqlen`` tokens of ``text`` (fewer if it has fewer), tokenizing only a
    prefix of it: ROW_CHARS_PER_TOKEN * seqlen characters, doubled until it gives
    ROW_SPARE_TOKENS more tokens than needed or is the whole text. Cutting a text changes
    only the tokens next to the cut (a tokenizer's merges stay inside a word), so the spare
    tokens keep the kept ones the same as the whole text's; a text of long tokens costs
    more rounds, never more than twice the characters its window needs."""
    chars = ROW_CHARS_PER_TOKEN * seqlen
    while True:
        tokens = tokenize(tokenizer, text[:chars])
        if chars >= len(text) or tokens.numel() >= seqlen + ROW_SPARE_TOKENS:
            return tokens[:seqlen]
        chars *= 2


def document_calibration(tokenizer, documents: Sequence[str], samples: int, seqlen: int,
                         seed: int = DEFAULT_SEED, *, samples_option: str = "samples",
                         seqlen_option: str = "seqlen") -> list[torch.Tensor]:
    """``samples`` documents picked at random with ``seed`` among those with any tokens, each
    its first ``seqlen`` tokens with BOS in front: windows (1, L_i), L_i <= seqlen [+ 1]."""
    if seqlen < 1:
        raise ValueError(f"{seqlen_option} must be a positive integer, got {seqlen}")
    if samples < 1:
        raise ValueError(f"{samples_option} must be a positive integer, got {samples}")
    windows = []
    for index in torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist():
        tokens = first_tokens(tokenizer, documents[index], seqlen)
        if tokens.numel():
            windows.append(add_bos(tokens[None], tokenizer))
            if len(windows) == samples:
                return windows
    raise ValueError(f"{samples_option} must be at most {len(windows)}: only {len(windows)} of the {len(documents)} "
                     f"documents have any tokens; got {samples}")
