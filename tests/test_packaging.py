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
