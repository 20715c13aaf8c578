"""lm-eval's own command line, in a process that has imported serq_ao.

``python -m serq_ao.eval.lm_eval_main --model hf --model_args pretrained=DIR --tasks ...`` takes
every flag of ``lm_eval``. Plain ``lm_eval`` cannot load a serq folder: its process never
imports serq_ao, so transformers cannot find the folder's quantization config and says so
("Failed to find class serq_ao.SERQCheckpointConfig ...").
"""

import serq_ao  # noqa: F401  (lets transformers load serq folders)
from serq_ao.extras import require

if __name__ == "__main__":
    require("lm_eval", "eval", "python -m serq_ao.eval.lm_eval_main")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
