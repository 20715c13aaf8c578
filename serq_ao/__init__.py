"""serq-ao: SERQ 4-bit weight and activation quantization for PyTorch models."""

import logging

# torchao logs failures to load its CUDA extensions on CPU-only machines; they are harmless
# for us, so keep them out of users' logs (must happen before torchao is first imported).
logging.getLogger("torchao").setLevel(logging.ERROR)
# torchao 0.18 registers its enums with torch's pytree at import, which torch 2.13 answers
# with a deprecation warning per enum: noise for our users, nothing they can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
