"""A streamed quantization that interrupts itself:
``python resume_fault_writer.py SOURCE OUT CONFIG SIGNAL WHERE LAYER [resume]``.

Quantizes the checkpoint SOURCE into OUT (``serq_ao.streaming.quantize_checkpoint``) with
the SERQConfig of the JSON ``CONFIG`` on fixed calibration ids, and sends itself SIGNAL (KILL
or INT) at LAYER: ``WHERE`` = ``boundary`` just after that layer's state is committed,
``shard`` after its shard is written but before the commit (a kill mid-layer), ``compute``
while its linears are being quantized. ``resume``: pass resume=True. SIGNAL NONE runs to the end.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serq_ao import streaming  # noqa: E402
from serq_ao.quant import pipeline  # noqa: E402
from serq_ao.quant.config import SERQConfig  # noqa: E402
from serq_ao.resume import PartialRun  # noqa: E402

source, out, config, signal_name, where, layer = sys.argv[1:7]
layer = int(layer)
resume = sys.argv[7:] == ["resume"]
CALIBRATION = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))


def interrupt():
    os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}"))


if signal_name != "NONE":
    if where == "boundary":
        save = PartialRun.save

        def saved(self, state, *args):
            save(self, state, *args)
            if state.next_layer == layer + 1:
                interrupt()

        PartialRun.save = saved
    elif where == "shard":
        write_layer = streaming.PackedShardWriter.write_layer

        def written(self, index, module):
            write_layer(self, index, module)
            if index == layer:
                interrupt()

        streaming.PackedShardWriter.write_layer = written
    elif where == "compute":
        quantize_linear = pipeline._quantize_linear
        seen = []

        def quantizing(model, linear_plan, *args):
            seen.append(linear_plan.name)
            if f".layers.{layer}." in linear_plan.name and len([n for n in seen if f".layers.{layer}." in n]) == 2:
                interrupt()
            return quantize_linear(model, linear_plan, *args)

        pipeline._quantize_linear = quantizing

# the report records the storage figures, as the CLI's does, so that a resumed run's can be compared
streaming.quantize_checkpoint(source, SERQConfig(**json.loads(config)), CALIBRATION, out, resume=resume,
                              error_windows=2, collect_statistics=True,
                              describe=lambda report, storage: {"storage": storage.to_dict()})
