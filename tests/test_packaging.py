"""What the wheel carries besides the code: the license it declares, the PEP 561 marker."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # the development environment's setuptools: no download
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("serq_ao-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_carries_the_license_and_the_typing_marker(wheel):
    names = wheel.namelist()
    assert "serq_ao/py.typed" in names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file).decode().startswith("BSD 3-Clause License")
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: BSD-3-Clause" in wheel.read(metadata).decode().splitlines()


def test_wheel_carries_the_task_definitions_and_its_extras(wheel):
    from serq_ao.eval.tasks import SHIPPED_TASKS

    names = wheel.namelist()
    for task in SHIPPED_TASKS:  # lm-eval reads them by path from the installed package
        assert f"serq_ao/eval/lm_tasks/{task}.yaml" in names
    assert "serq_ao/eval/lm_tasks/olmo_data.py" in names  # the module their !function tags name
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    lines = wheel.read(metadata).decode().splitlines()
    assert {"Provides-Extra: eval", "Provides-Extra: plot", "Provides-Extra: gguf", "Provides-Extra: dev"} <= set(lines)
    assert 'Requires-Dist: triton>=3.6; platform_system == "Linux"' in lines


def test_wheel_registers_the_vllm_plugin(wheel):
    """vLLM loads plugins from the "vllm.general_plugins" entry points of installed packages."""
    import configparser
    import importlib

    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    target = parser["vllm.general_plugins"]["serq"]
    assert target == "serq_ao.integrations.vllm:register"
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))  # importable without vLLM
    assert f"{module.replace('.', '/')}/linear.py" in wheel.namelist()
