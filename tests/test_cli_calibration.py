"""serq quantize on the user's own calibration data: a text file, a local dataset (folder,
Arrow, JSON Lines), with --calib-samples, --calib-seqlen and --seed."""

import json
import re

import datasets
import pytest
import torch

from serq_ao.calibration_data import document_calibration, load_documents, text_calibration
from serq_ao.cli.main import main
from tests.conftest import make_byte_tokenizer

TEXT = " ".join(f"sentence {i} of a file the user calibrates on, with its own words." for i in range(40))
DOCUMENTS = [f"document {i}: " + "words " * (3 + 2 * i) for i in range(12)] + [""]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-data")
    (root / "calib.txt").write_text(TEXT)
    table = datasets.Dataset.from_dict({"body": DOCUMENTS, "n": list(range(len(DOCUMENTS)))})
    datasets.DatasetDict({"train": table}).save_to_disk(str(root / "folder"))
    with open(root / "rows.jsonl", "w") as f:
        for doc in DOCUMENTS:
            f.write(json.dumps({"text": doc}) + "\n")
    return root


def quantize(tiny_model_dir, out, *extra):
    argv = ["quantize", str(tiny_model_dir), "-o", str(out), "--rank", "32", "--calib-seqlen", "32",
            "--no-diagnostics", "--quiet", "--json", *extra]
    return main(argv)


def test_text_windows_are_seeded_picks_of_the_files_windows():
    tokenizer = make_byte_tokenizer()
    a = text_calibration(tokenizer, TEXT, 4, 32, seed=0)
    assert a.shape == (4, 33) and bool((a[:, 0] == tokenizer.bos_token_id).all())
    assert torch.equal(a, text_calibration(tokenizer, TEXT, 4, 32, seed=0))
    assert not torch.equal(a, text_calibration(tokenizer, TEXT, 4, 32, seed=1))
    whole = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    for window in a[:, 1:]:  # each is one of the file's consecutive windows of 32 tokens
        start = next(i for i in range(0, whole.numel(), 32) if torch.equal(whole[i:i + 32], window))
        assert start % 32 == 0


def test_documents_are_cut_at_seqlen_and_empty_ones_skipped(data):
    tokenizer = make_byte_tokenizer()
    documents = load_documents(data / "rows.jsonl")
    assert list(documents) == DOCUMENTS
    windows = document_calibration(tokenizer, documents, 12, 16, seed=3)
    assert len(windows) == 12 and {w.shape[1] for w in windows} <= set(range(2, 18))
    assert max(w.shape[1] for w in windows) == 17  # BOS + 16: the long ones are cut
    with pytest.raises(ValueError, match="samples must be at most 12"):
        document_calibration(tokenizer, documents, 13, 16)


@pytest.mark.parametrize("source", ["text", "folder", "jsonl"])
def test_quantize_on_the_users_data(tiny_model_dir, data, tmp_path, capsys, source):
    extra = {"text": ["--calib-text", str(data / "calib.txt"), "--calib-samples", "3", "--seed", "7"],
             "folder": ["--calib-dataset", str(data / "folder"), "--calib-column", "body", "--calib-samples", "5"],
             "jsonl": ["--calib-dataset", str(data / "rows.jsonl"), "--calib-samples", "5", "--seed", "2"]}[source]
    assert quantize(tiny_model_dir, tmp_path / "q", *extra) == 0
    capsys.readouterr()
    calibration = json.loads((tmp_path / "q" / "serq_report.json").read_text())["calibration"]
    expected = {"text": {"text": str(data / "calib.txt"), "seed": 7, "windows": 3, "seqlen": 32},
                "folder": {"dataset": str(data / "folder"), "column": "body", "seed": 0, "windows": 5, "seqlen": 32},
                "jsonl": {"dataset": str(data / "rows.jsonl"), "column": "text", "seed": 2, "windows": 5,
                          "seqlen": 32}}[source]
    assert calibration == expected


def _shards(folder) -> dict:
    """Every shard's metadata and tensors (not its bytes: safetensors writes its metadata map
    in an order of its own)."""
    from safetensors import safe_open

    content = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            content[path.name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return content


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and a[k][1].keys() == b[k][1].keys()
        and all(torch.equal(a[k][1][t], b[k][1][t]) for t in a[k][1]) for k in a)


def test_same_seed_same_model(tiny_model_dir, data, tmp_path, capsys):
    outs = []
    for name in ("a", "b"):
        assert quantize(tiny_model_dir, tmp_path / name, "--calib-text", str(data / "calib.txt"),
                        "--calib-samples", "3", "--seed", "5") == 0
        outs.append(_shards(tmp_path / name))
    assert outs[0] and _same(*outs)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "--seed picks the windows of --calib-text or --calib-dataset"),
    (["--calib-column", "body"], "--calib-column names a column of --calib-dataset"),
    (["--calib-dataset", "{data}/folder", "--calib-column", "nope"], "has no column 'nope'; its columns: body, n"),
    (["--calib-dataset", "{data}/folder", "--calib-column", "n"], "column 'n' of .* must hold text, found int"),
    (["--calib-dataset", "{data}/rows.jsonl", "--calib-samples", "40"],
     "--calib-dataset: --calib-samples must be at most 12"),
    (["--calib-text", "{data}/calib.txt", "--calib-samples", "500"], r"--calib-text: --calib-samples must be in \[1, "),
    (["--calib-text", "{data}/missing.txt"], "no such text file"),
    (["--calib-dataset", "{data}/calib.txt"], "a dataset must be a save_to_disk folder"),
])
def test_calibration_option_mistakes_exit_2(tiny_model_dir, data, tmp_path, capsys, extra, message):
    extra = [e.replace("{data}", str(data)) for e in extra]
    assert quantize(tiny_model_dir, tmp_path / "q", *extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "q").exists()


def test_one_calibration_source_at_a_time(tiny_model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        quantize(tiny_model_dir, tmp_path / "q", "--calib-text", str(data / "calib.txt"), "--calib-corpus", "wiki")
    assert raised.value.code == 2
    assert "not allowed with argument --calib-text" in capsys.readouterr().err
