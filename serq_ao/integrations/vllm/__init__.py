"""vLLM plugin: serve packed serq folders with vLLM (``vllm serve <folder>``).

vLLM loads it through the ``vllm.general_plugins`` entry point (pyproject.toml), in every
process it starts, and :func:`register` adds the quantization method "serq"
(:mod:`serq_ao.integrations.vllm.config`), whose linear layers call serq's ops
(:mod:`serq_ao.integrations.vllm.linear`): the native CPU kernels on CPU, the Triton kernels
on CUDA.

The plugin reads folders and runs kernels; it does not use serq's transformers integration,
so it runs beside the transformers release vLLM pins (``make vllm-env``).
"""

from __future__ import annotations


def register() -> None:
    """Register "serq" with vLLM (the entry point; running it twice is harmless)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from serq_ao.integrations.vllm.config import METHOD, SERQVllmConfig

    if METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(METHOD)(SERQVllmConfig)
