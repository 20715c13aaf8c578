"""Issue 29, startup: ``serq --version``, ``--help`` and usage mistakes answer at once (no torch,
transformers, torchao, lm_eval or datasets imported), each mistake in one line with exit 2;
``import serq_ao`` stays light and still lets transformers load serq folders; ``--help``
states the default every quantization option really has."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "torchao", "lm_eval", "datasets", "triton")

# runs the console script's main() with argv, as `serq` does, then reports on stderr's last line
# which heavy packages the process had imported by its exit
RUN_SERQ = f"""
import atexit, json, sys
atexit.register(lambda: sys.__stderr__.write(
    "MODULES " + json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))) + "\\n"))
sys.argv = ["serq", *sys.argv[1:]]
from serq_ao.cli.main import main
sys.exit(main())
"""


def run_serq(*argv: str) -> tuple[int, str, list[str], list[str]]:
    """(exit status, stdout, stderr lines, heavy packages imported) of `serq argv` in a fresh process."""
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, "-c", RUN_SERQ, *argv], capture_output=True, text=True, env=env,
                             timeout=300, cwd=ROOT)
    lines = process.stderr.splitlines()
    assert lines and lines[-1].startswith("MODULES "), process.stderr[-3000:]
    return process.returncode, process.stdout, lines[:-1], json.loads(lines[-1].removeprefix("MODULES "))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["quantize", "--help"], ["eval", "tasks", "--help"],
                                  ["inspect", "--help"]])
def test_version_and_help_import_no_heavy_package(argv):
    status, out, err, heavy = run_serq(*argv)
    assert status == 0 and out and not err, (status, err)
    assert heavy == [], f"serq {' '.join(argv)} imported {heavy}"


# usage mistakes: (argv, what the one line must say)
MISTAKES = [
    ([], r"serq: error: the following arguments are required: COMMAND"),
    (["quantise", "m"], r"invalid choice: 'quantise' .*did you mean 'quantize'\?"),
    (["quantize"], r"serq quantize: error: the following arguments are required: model, -o/--out"),
    (["quantize", "m", "-o", "x", "--format", "mxfp"], r"argument --format: invalid choice: 'mxfp' "
                                                       r"\(choose from mxfp4, w4a8, w4a4\); did you mean 'mxfp4'\?"),
    (["quantize", "m", "-o", "x", "--rotation", "48"], r"argument --rotation: invalid choice: 48"),
    (["quantize", "m", "-o", "x", "--rank", "-32"], r"argument --rank: expected an integer >= 0, got -32"),
    (["quantize", "m", "-o", "x", "--device", "cuda0"], r"argument --device: device must be cpu, cuda, cuda:N or auto"),
    (["eval"], r"serq eval: error: the following arguments are required: EVALUATION"),
    (["eval", "ppl"], r"serq eval ppl: error: the following arguments are required: model"),
    (["compare", "--corpus", "wikipedia"], r"argument --corpus: invalid choice: 'wikipedia'"),
]


@pytest.mark.parametrize(("argv", "message"), MISTAKES, ids=[" ".join(a) or "no-args" for a, _ in MISTAKES])
def test_usage_mistakes_are_one_line_exit_2_and_import_nothing_heavy(argv, message):
    status, out, err, heavy = run_serq(*argv)
    assert status == 2 and out == "", (status, out)
    assert len(err) == 1 and re.search(message, err[0]), err
    assert err[0].endswith("--help)"), err  # where to read more
    assert heavy == [], f"serq {' '.join(argv)} imported {heavy} to refuse a usage mistake"


def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path):
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last, on any machine
    status, out, err, _ = run_serq("quantize", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"),
                                   "--device", device)
    assert status == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("serq quantize: error: argument --device: device 'cuda:") and "--help" in err[0], err
    assert not (tmp_path / "out").exists()


def test_import_serq_ao_is_light_and_still_registers_with_transformers():
    # both orders: serq_ao before transformers' quantizers (the import hook), and after them
    code = """
import json, sys
order = sys.argv[1]
if order == "transformers first":
    import transformers.quantizers.auto
import serq_ao
heavy_after_import = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchao"})
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoHfQuantizer
legacy = AutoHfQuantizer.supports_quant_method({"quant_method": "serq"})  # transformers' first look
print("RESULT " + json.dumps({"heavy": heavy_after_import, "legacy": legacy,
                              "torchao": AUTO_QUANTIZER_MAPPING["torchao"].__name__}))
"""
    for order in ("serq_ao first", "transformers first"):
        process = subprocess.run([sys.executable, "-c", code, order], capture_output=True, text=True, timeout=300,
                                 cwd=ROOT)
        lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, process.stderr[-3000:]
        result = json.loads(lines[-1].removeprefix("RESULT "))
        if order == "serq_ao first":
            assert result["heavy"] == [], f"import serq_ao imported {result['heavy']}"
        assert result["legacy"] is True, order  # else transformers skips a "serq" folder's quantization
        assert result["torchao"] == "TorchAoOrSERQHfQuantizer", (order, result)


def test_packed_tensors_load_with_weights_only_after_import_serq_ao_in_either_order(tmp_path):
    # README: torch.load(weights_only=True) of packed tensors works once serq_ao is imported; the
    # lazy package must keep that whether the user imports torch before serq_ao or after it
    import torch

    from tests.conftest import make_tiny_llama
    from serq_ao import SERQConfig, quantize_

    model = make_tiny_llama()
    quantize_(model, SERQConfig(format="mxfp4", rank=32), calibration=torch.randint(0, 200, (2, 32)))
    path = tmp_path / "packed.pt"
    torch.save(model.state_dict(), path)
    code = """
import sys
if sys.argv[2] == "torch first":
    import torch, serq_ao
else:
    import serq_ao
    assert "torch" not in sys.modules
    import torch
state = torch.load(sys.argv[1], weights_only=True)
print("RESULT", sorted({type(v).__name__ for v in state.values()}))
"""
    for order in ("torch first", "serq_ao first"):
        process = subprocess.run([sys.executable, "-c", code, str(path), order], capture_output=True, text=True,
                                 timeout=300, cwd=ROOT)
        assert "RESULT ['SERQMXFP4Tensor', 'Tensor']" in process.stdout, (order, process.stderr[-3000:])


def test_lazy_public_api_is_the_defining_modules_objects():
    import importlib

    import serq_ao

    for name in serq_ao.__all__:
        value = getattr(serq_ao, name)
        assert value is getattr(importlib.import_module(serq_ao._API[name]), name), name
        assert name in dir(serq_ao)
    with pytest.raises(AttributeError, match="no attribute 'quantise_'"):
        serq_ao.quantise_
    namespace: dict = {}
    exec("from serq_ao import *", namespace)
    assert set(serq_ao.__all__) <= set(namespace)


def test_every_user_error_names_an_exception_class():
    import importlib

    from serq_ao.messages import USER_ERRORS, user_error_status

    for name, status in USER_ERRORS.items():
        module, cls = name.split(":")
        error = getattr(importlib.import_module(module), cls)
        assert isinstance(error, type) and issubclass(error, Exception), name
        assert user_error_status(error.__new__(error)) == status, name
    assert user_error_status(RuntimeError("a bug")) is None


# --- --help states the true default of each quantization option

QUANTIZATION_OPTIONS = ("rank", "rank_allocation", "flattening_strength", "saliency_unit", "scale_mode",
                        "weight_scales", "rotation", "gptq", "gptq_order", "residual_order")


def _config(*argv: str):
    from serq_ao.cli.common import config_from_args
    from serq_ao.cli.main import build_parser

    return config_from_args(build_parser().parse_args(["quantize", "m", "-o", "x", *argv]))


def _help_of(option: str) -> str:
    from serq_ao.cli.main import build_parser

    parser = build_parser()
    quantize = next(a for a in parser._actions if a.dest == "command").choices["quantize"]
    action = next(a for a in quantize._actions if a.dest == option)
    return " ".join(quantize._get_formatter()._get_help_string(action).split())


@pytest.mark.parametrize("option", QUANTIZATION_OPTIONS)
def test_help_states_the_default_the_configs_really_use(option):
    from serq_ao.cli.main import render_default
    from serq_ao.options import FORMATS

    # what the command line really builds with the option left out: method serq under its
    # default recipe, per format; recipe paper and another method (rtn) otherwise
    recipe = {fmt: getattr(_config("--format", fmt), option) for fmt in FORMATS}
    others = {getattr(_config("--format", fmt, "--recipe", "paper"), option) for fmt in FORMATS}
    if option in ("scale_mode", "weight_scales", "rotation", "gptq", "gptq_order"):  # options rtn uses too
        others |= {getattr(_config("--format", fmt, "--method", "rtn"), option) for fmt in FORMATS}
    assert len(others) == 1, (option, others)
    plain = lambda v: v.value if hasattr(v, "value") else v  # noqa: E731  (enums as the help spells them)
    expected = render_default({f: plain(v) for f, v in recipe.items()}, plain(others.pop()))
    assert expected in _help_of(option), (option, expected, _help_of(option))


def test_rotation_help_says_what_the_default_recipe_rotates():
    # the report: --help said --rotation defaults to 0 while the default recipe used 32
    text = _help_of("rotation")
    assert "default 0:" not in text and "default 0;" not in text
    assert re.search(r"default 32 at --format mxfp4, 128 at --format w4a8 and w4a4, with method serq's "
                     r"--recipe rotated-gptq, 0 otherwise", text), text


def test_registration_hook_never_breaks_a_transformers_without_its_entry_points(caplog):
    import types

    from serq_ao import registration

    class AutoHfQuantizer:  # a release that reads its registries some other way
        @classmethod
        def from_config(cls, config):
            return config

    module = types.ModuleType("fake_transformers_quantizers_auto")
    module.AutoHfQuantizer = AutoHfQuantizer
    registration._wrap_entry_points(module)
    registration._wrap_entry_points(module)  # twice: wrapped once
    assert "AutoQuantizationConfig.from_dict" in caplog.text and "register()" in caplog.text
    wrapped = AutoHfQuantizer.__dict__["from_config"].__func__
    assert wrapped.__serq_registers__ and not getattr(wrapped.__wrapped__, "__serq_registers__", False)
