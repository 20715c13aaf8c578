import json
import subprocess
import sys
from pathlib import Path

import pytest

from serq_ao.cli.main import main


def test_eval_ppl_json(tiny_model_dir, capsys):
    code = main(["eval", "ppl", str(tiny_model_dir), "--windows", "2", "--seqlen", "32", "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    record = json.loads(out)  # one JSON object and nothing else on stdout
    assert {"ppl", "windows", "tokens", "seconds", "nll"} <= record.keys()
    assert record["windows"] == 2 and record["tokens"] == 2 * 32  # BOS: every text token scored
    assert record["ppl"] > 1


def test_eval_ppl_table(tiny_model_dir, capsys):
    assert main(["eval", "ppl", str(tiny_model_dir), "--windows", "1", "--seqlen", "16", "--quiet"]) == 0
    assert "Perplexity" in capsys.readouterr().out


def test_unknown_model_is_a_one_line_usage_error(capsys):
    assert main(["eval", "ppl", "no-such-model", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model must be one of" in err and "Traceback" not in err and len(err.splitlines()) <= 2


def test_too_many_windows_is_a_usage_error(tiny_model_dir, capsys):
    assert main(["eval", "ppl", str(tiny_model_dir), "--windows", "100000", "--quiet"]) == 2
    assert "n_windows must be in" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "ppl", "x", "--windows", "0"], ["eval", "ppl", "x", "--corpus", "c4"], ["eval"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_console_script_is_installed():
    # the `serq` entry point sits next to the interpreter of the environment under test
    script = Path(sys.executable).parent / "serq"
    done = subprocess.run([str(script), "eval", "ppl", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--windows" in done.stdout
