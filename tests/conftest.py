"""Shared fixtures: a real byte-level tokenizer and a tiny random Llama, both made here."""

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import serq_ao  # noqa: F401  (quiet torchao before anything imports it)
from serq_ao.testing import BYTE_VOCAB, make_byte_tokenizer  # noqa: F401  (tests import them from here)

# Triton kernel tests need TRITON_INTERPRET=1 from the start of the process (the Makefile runs
# them in a pytest process of their own) or a CUDA device (benchmarks/gpu_check.py runs them).
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["kernels_interpret"]


@contextlib.contextmanager
def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (its own folder importable, as when it runs),
    unloaded afterwards."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def make_tiny_llama(vocab_size: int = BYTE_VOCAB + 1, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def reference_kernels(monkeypatch):
    """The packed ops on their plain-PyTorch reference (``SERQ_CPU_KERNEL=reference``), which
    computes what the evaluation mode computes, bit for bit; the native CPU kernels agree with
    it up to float32 summation order (tests/kernels/test_cpu_native.py)."""
    monkeypatch.setenv("SERQ_CPU_KERNEL", "reference")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer(bos=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved Hugging Face folder: tiny random Llama + byte tokenizer with BOS."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer(bos=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def quantized_tiny_dir(tiny_model_dir, tmp_path_factory):
    """``serq quantize`` of the tiny model: a packed SERQ-MXFP4 folder, rank 32."""
    from serq_ao.cli.main import main

    out = tmp_path_factory.mktemp("q") / "tiny-serq"
    argv = ["quantize", str(tiny_model_dir), "--rank", "32", "--out", str(out),
            "--calib-windows", "2", "--calib-seqlen", "32", "--quiet"]
    assert main(argv) == 0
    return out


@pytest.fixture
def serq_cache(tmp_path, monkeypatch):
    """A fresh, empty SERQ_CACHE for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SERQ_CACHE", str(cache))
    return cache
