"""Issue 29, calibration input faults: each is one line naming the option or file, raised where
the mistake is made, and memory follows the tokens used, not the size of the data."""

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

import serq_ao
from serq_ao import SERQConfig
from serq_ao import calibration_data
from serq_ao.calibration_data import document_calibration, load_documents, text_calibration, text_file_calibration
from serq_ao.cli.common import calibration_from_args
from serq_ao.cli.main import main
from tests.conftest import make_byte_tokenizer, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def words(n: int, rng: random.Random) -> str:
    vocabulary = ["model", "token", "window", "quantize", "the", "of", "and", "a", "scale", "rank"]
    lines, count = [], 0
    while count < n:
        line = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 20))) + ".\n"
        lines.append(line)
        count += len(line)
    return "".join(lines)


# --- 1. the library refuses calibration longer than the model's positions -------------------------


@pytest.mark.parametrize("form", ["tensor", "list"])
def test_library_refuses_calibration_past_max_position_embeddings(form):
    model = make_tiny_llama()  # max_position_embeddings 512
    ids = torch.randint(0, 256, (1, 600))
    calibration = ids if form == "tensor" else [torch.randint(0, 256, (1, 40)), ids]
    with pytest.raises(ValueError) as raised:
        serq_ao.quantize_(model, SERQConfig(format="mxfp4", rank=32), calibration=calibration)
    message = str(raised.value)
    assert "needs 600 positions per sequence, the model has max_position_embeddings 512" in message
    assert message.startswith("calibration")
    # the limit itself is fine: 512 tokens calibrate
    serq_ao.quantize_(make_tiny_llama(), SERQConfig(format="mxfp4", rank=32),
                      calibration=torch.randint(0, 256, (1, 512)))


# --- CLI faults, in a fresh process as a user meets them ------------------------------------------


def serq(tiny_model_dir, out, *extra):
    argv = [sys.executable, "-m", "serq_ao.cli.main", "quantize", str(tiny_model_dir), "-o", str(out), "--rank", "32",
            "--calib-seqlen", "32", "--calib-samples", "2", "--no-diagnostics", "--quiet", *map(str, extra)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)


def one_line_error(run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("serq: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    return errors[0]


def test_cli_empty_and_short_text_say_so(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = one_line_error(serq(tiny_model_dir, tmp_path / "q", "--calib-text", empty))
    assert f"--calib-text: {empty} is empty" in line and "[1, 0]" not in line
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "one"}\n{"text": bad}\n', "line 2 is not JSON"),
    (b"", "is empty"),
    (bytes(random.Random(os.getpid()).randrange(128, 256) for _ in range(3000)), "line 1 is not UTF-8 text"),
])
def test_cli_broken_jsonl_is_one_line_naming_it(tiny_model_dir, tmp_path, content, expected):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    line = one_line_error(serq(tiny_model_dir, tmp_path / "q", "--calib-dataset", path))
    assert f"--calib-dataset: {path}" in line and expected in line, line


# --- the same faults and more, in process (cheaper): the message, and where it is raised ----------


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    rows = {"nocol.jsonl": [{"body": "x"}], "numbers.jsonl": [{"text": "a"}, {"text": 7}],
            "null.jsonl": [{"text": "a"}, {"text": None}], "list.jsonl": [{"text": ["a", "b"]}]}
    for name, content in rows.items():
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in content))
    (root / "blank.jsonl").write_text("\n  \n\n")
    (root / "array.jsonl").write_text('["a", "b"]\n')
    table = datasets.Dataset.from_dict({"text": ["a b c " * 20, "d e f " * 20], "n": [1, 2]})
    table.save_to_disk(str(root / "folder"))
    arrow = next((root / "folder").glob("*.arrow"))
    data = arrow.read_bytes()
    (root / "damaged.arrow").write_bytes(data[:len(data) // 2])
    missing = root / "missing"
    table.save_to_disk(str(missing))
    next(missing.glob("*.arrow")).unlink()
    (root / "notdataset").mkdir()
    (root / "notdataset" / "notes.txt").write_text("hello")
    with_nulls = datasets.Dataset.from_dict({"text": ["a b c", None]})
    with_nulls.to_parquet(str(root / "unused.parquet"))  # a suffix we do not read
    with_nulls.save_to_disk(str(root / "nulls"))
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})) \
        .save_to_disk(str(root / "no-rows"))
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (root / "short.txt").write_text("ten bytes!")
    (root / "three.txt").write_text("abc")
    return root


@pytest.mark.parametrize("name, column, message", [
    ("nocol.jsonl", "text", r"nocol.jsonl line 1 has no column 'text'; its columns: body"),
    ("numbers.jsonl", "text", r"column 'text' of .*numbers.jsonl must hold text, found int \(.* line 2\)"),
    ("null.jsonl", "text", r"must hold text, found null \(.* line 2\)"),
    ("list.jsonl", "text", r"must hold text, found list \(.* line 1\)"),
    ("blank.jsonl", "text", r"blank.jsonl has only blank lines"),
    ("array.jsonl", "text", r"array.jsonl line 1 is a JSON list, not an object"),
    ("damaged.arrow", "text", r"damaged.arrow is not a readable Arrow file"),
    ("missing", "text", r"missing is not a readable dataset saved with save_to_disk \(.*No such file"),
    ("notdataset", "text", r"notdataset is a folder but not a dataset saved with save_to_disk"),
    ("nulls", "text", r"column 'text' of .*nulls must hold text, found null in 1 of its 2 rows"),
    ("folder", "n", r"column 'n' of .*folder must hold text, found int64"),
    ("no-rows", "text", r"no-rows has no rows$"),
    ("unused.parquet", "text", r"a dataset must be a save_to_disk folder, an .arrow file or .jsonl lines"),
])
def test_load_documents_faults_name_the_file(broken, name, column, message):
    with pytest.raises(ValueError, match=message):
        load_documents(broken / name, column)


def args_for(**given) -> argparse.Namespace:
    options = dict(calib_text=None, calib_dataset=None, calib_corpus=None, calib_column=None, seed=None,
                   calib_windows=2, calib_seqlen=32)
    return argparse.Namespace(**{**options, **given})


@pytest.mark.parametrize("given, message", [
    ({"calib_text": "short.txt"}, r"--calib-text: .*short.txt has 10 tokens: one window of --calib-seqlen 32 "
                                  r"needs 32 tokens"),
    ({"calib_text": "latin1.txt"}, r"--calib-text: .*latin1.txt is not UTF-8 text \(invalid continuation byte "
                                   r"at byte 3\)"),
    ({"calib_text": "folder"}, r"--calib-text: .*folder is a directory, not a text file"),
    ({"calib_text": "/dev/null"}, r"--calib-text: /dev/null is not a regular file"),
    ({"calib_text": "three.txt", "calib_seqlen": 1, "calib_windows": 10 ** 6},
     r"--calib-text: --calib-samples must be in \[1, 3\]"),
    ({"calib_dataset": "folder", "calib_windows": 3}, r"--calib-dataset: --calib-samples must be at most 2"),
])
def test_calibration_options_faults(broken, given, message):
    from serq_ao.cli.common import UsageError

    given = {k: (str(broken / v) if k in ("calib_text", "calib_dataset") else v) for k, v in given.items()}
    with pytest.raises(UsageError, match=message):
        calibration_from_args(make_byte_tokenizer(), args_for(**given), make_tiny_llama())


def test_seqlen_1_and_empty_rows_work(broken, tmp_path):
    tokenizer = make_byte_tokenizer()
    windows = text_calibration(tokenizer, "abcdefgh", 3, 1, seed=4)
    assert windows.shape == (3, 2) and set(windows[:, 1].tolist()) <= set(tokenizer("abcdefgh",
                                                                                  add_special_tokens=False)["input_ids"])
    rows = tmp_path / "some-empty.jsonl"
    rows.write_text('{"text": ""}\n\n{"text": "kept row"}\n{"text": ""}\n')
    documents = load_documents(rows)
    assert list(documents) == ["", "kept row", ""]
    (window,) = document_calibration(tokenizer, documents, 1, 32)
    assert window[0, 1:].tolist() == tokenizer("kept row", add_special_tokens=False)["input_ids"]


# --- 4. memory: the tokenizer sees a bounded number of characters at a time ------------------------


class RecordingTokenizer:
    """The byte tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self):
        self.inner, self.lengths = make_byte_tokenizer(), []
        self.bos_token_id = self.inner.bos_token_id

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)


def test_text_file_is_tokenized_in_bounded_pieces_with_the_same_windows(tmp_path, monkeypatch):
    rng = random.Random()
    text = words(200_000, rng)
    path = tmp_path / "big.txt"
    path.write_text(text)
    seed = rng.randrange(1000)
    whole = text_calibration(make_byte_tokenizer(), text, 5, 64, seed)  # one piece: as tokenized whole
    monkeypatch.setattr(calibration_data, "TEXT_PIECE", 16_384)
    tokenizer = RecordingTokenizer()
    picked = calibration_from_args(tokenizer, args_for(calib_text=str(path), calib_windows=5, calib_seqlen=64,
                                                       seed=seed), make_tiny_llama())
    assert max(tokenizer.lengths) <= 16_384 < len(text)
    # a byte tokenizer's tokens do not depend on the cuts: the same windows as the whole text's
    assert torch.equal(picked, whole)
    assert torch.equal(text_calibration(make_byte_tokenizer(), text, 5, 64, seed), whole)


def test_long_jsonl_row_is_tokenized_as_a_prefix(tmp_path):
    row = words(300_000, random.Random())
    path = tmp_path / "one-row.jsonl"
    path.write_text(json.dumps({"text": row}) + "\n")
    tokenizer = RecordingTokenizer()
    (window,) = calibration_from_args(tokenizer, args_for(calib_dataset=str(path), calib_windows=1, calib_seqlen=64),
                                      make_tiny_llama())
    assert max(tokenizer.lengths) <= 64 * calibration_data.ROW_CHARS_PER_TOKEN < len(row)
    assert window[0, 1:].tolist() == make_byte_tokenizer()(row[:64], add_special_tokens=False)["input_ids"]


def test_first_tokens_grows_the_prefix_until_it_has_enough():
    class Wide:
        """One token per 40 characters: the first prefix is too short."""
        bos_token_id = None
        lengths = []

        def __call__(self, text, **kwargs):
            self.lengths.append(len(text))
            return {"input_ids": list(range(len(text) // 40))}

    tokenizer = Wide()
    tokens = calibration_data.first_tokens(tokenizer, "x" * 100_000, 64)
    assert tokens.tolist() == list(range(64))
    assert tokenizer.lengths[0] == 64 * calibration_data.ROW_CHARS_PER_TOKEN
    assert max(tokenizer.lengths) < 2 * 40 * (64 + calibration_data.ROW_SPARE_TOKENS)


def test_file_pieces_keep_characters_and_newlines_whole(tmp_path, monkeypatch):
    """Cuts never fall inside a UTF-8 sequence or a \\r\\n, whose newline the file's text
    mode reading turns into one \\n: the windows are those of the text read whole."""
    rng = random.Random()
    lines = ["".join(rng.choice("aé€😀 ") for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    path = tmp_path / "mixed.txt"
    path.write_bytes("\r\n".join(lines).encode("utf-8"))
    seed = rng.randrange(1000)
    whole = text_calibration(make_byte_tokenizer(), calibration_data.read_text_file(path), 6, 48, seed)
    monkeypatch.setattr(calibration_data, "TEXT_PIECE", 4096)
    assert len(list(calibration_data._file_text(path).pieces())) > 10
    assert torch.equal(text_file_calibration(make_byte_tokenizer(), path, 6, 48, seed), whole)


@pytest.mark.parametrize("kind", [str, bytes])
def test_cuts_fall_at_a_single_space_between_words(kind):
    text = "first words\n\nsecond  part of  it\n\n  "
    buffer = text if kind is str else text.encode()
    at = calibration_data._cut(buffer, len(buffer) - 1)
    # the last space with a non-space on both sides; none in "  it" or in the trailing blanks
    assert text[:at] == "first words\n\nsecond  part"


def test_a_text_whose_tokens_change_between_reads_is_a_value_error(byte_tokenizer, tmp_path, monkeypatch):
    # the windows are counted on a first read and cut from a second: a file edited meanwhile (or
    # a tokenizer that is not deterministic) is the user's fault, a ValueError the CLI turns into
    # one line naming --calib-text, never a RuntimeError traceback
    from serq_ao import calibration_data
    from serq_ao.calibration_data import text_file_calibration

    monkeypatch.setattr(calibration_data, "TEXT_PIECE", 64)  # many pieces, so some are read twice
    path = tmp_path / "notes.txt"
    path.write_text("the quick brown fox jumps over the lazy dog " * 40, encoding="utf-8")

    class Drifting:  # the byte tokenizer, but a text it has seen before gives one token more
        seen = set()

        def __call__(self, text, **kwargs):
            encoded = byte_tokenizer(text, **kwargs)
            if text in self.seen:
                encoded["input_ids"] = [*encoded["input_ids"], 1]
            self.seen.add(text)
            return encoded

        def __getattr__(self, name):
            return getattr(byte_tokenizer, name)

    assert text_file_calibration(byte_tokenizer, path, 2, 32).shape == (2, 33)  # the honest tokenizer: fine
    with pytest.raises(ValueError, match="changed meanwhile, or the tokenizer is not deterministic"):
        text_file_calibration(Drifting(), path, 2, 32)
