"""torch.export and AOTInductor packages of a (quantized) causal LM, for fixed input shapes.

The exported program maps input ids (batch, seqlen) to logits, without a KV cache; each
packed linear stays one ``serq`` op node. Files are written under the rules of
:mod:`serq_ao.files` (a temporary name beside the destination, renamed into place; an existing
file is replaced only with ``overwrite``), so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

import torch
from torch import nn

from serq_ao.files import Output, claim_output


class CausalLMLogits(nn.Module):
    """``input_ids -> logits`` of a transformers causal LM, no cache: one tensor in, one out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, use_cache=False).logits


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: str
    kind: str  # "program" (torch.export .pt2) or "aoti" (AOTInductor package .pt2)
    batch: int
    seqlen: int
    serq_nodes: int  # custom op nodes in the exported graph: one per packed linear
    seconds: float
    smoke_max_abs_diff: float  # reloaded file vs eager model, on the example input
    smoke_ok: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_serq_nodes(program: torch.export.ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("serq."))


def example_input(model: nn.Module, batch: int, seqlen: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=generator)


@torch.no_grad()
def export_model(model: nn.Module, out: str | os.PathLike | Output, *, batch: int = 1, seqlen: int = 128,
                 aoti: bool = False, atol: float = 1e-3, overwrite: bool = False) -> ExportResult:
    """Export ``model`` for inputs (batch, seqlen) to ``out`` (.pt2), reload it and compare
    its logits with the eager model's on an example input. An existing ``out`` is replaced
    only with ``overwrite``; ``out`` may be an :class:`~serq_ao.files.Output` the caller claimed."""
    if not isinstance(out, Output):
        if Path(out).suffix != ".pt2":
            raise ValueError(f"out must be a .pt2 file, got {out}")
        with claim_output(out, option="out", folder=False, overwrite=overwrite) as output:
            return export_model(model, output, batch=batch, seqlen=seqlen, aoti=aoti, atol=atol)
    if batch < 1 or seqlen < 1:
        raise ValueError(f"batch and seqlen must be positive, got {batch} and {seqlen}")
    started = time.perf_counter()
    wrapper = CausalLMLogits(model).eval()
    ids = example_input(model, batch, seqlen)
    program = torch.export.export(wrapper, (ids,))
    with out.write() as tmp:
        if aoti:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            runner = torch._inductor.aoti_load_package(str(tmp))
        else:
            # through memory: torch's zip writer aborts the process on a full disk instead of raising
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            Path(tmp).write_bytes(buffer.getbuffer())
            runner = torch.export.load(tmp).module()
        difference = (runner(ids) - wrapper(ids)).abs().max().item()
    return ExportResult(str(out.path), "aoti" if aoti else "program", batch, seqlen, count_serq_nodes(program),
                        time.perf_counter() - started, difference, difference <= atol)
