"""Calibration data as users have it: a tensor, a list of tensors of any lengths, batches
from a tokenizer or a DataLoader with padding. Each row is one window; the numbers are those
of the same windows given as a tensor."""

import copy

import pytest
import torch

import serq_ao
from serq_ao.passes import analyze
from serq_ao.quant.calibration import collect_statistics
from serq_ao.quant.calibration_input import calibration_windows
from tests.conftest import make_tiny_llama

PAD = 0


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=4)


def _ids(n, length, seed):
    return torch.randint(1, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, config, calibration):
    quantized = copy.deepcopy(model)
    serq_ao.quantize_model(quantized, config, calibration)
    with torch.no_grad():
        return quantized(_ids(2, 24, 99)).logits


def _padded(rows, side):
    """A tokenizer-style batch of ``rows`` (1-D tensors), padded on ``side``."""
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, r.numel()) if side == "right" else slice(width - r.numel(), width)
        ids[i, span], mask[i, span] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("fields", [{"rank": 32}, {"rank": 32, "gptq": True}])
def test_every_form_of_the_same_windows_gives_the_same_model(model, fields):
    config = serq_ao.SERQConfig(**fields)
    ids = _ids(4, 32, 0)
    expected = _logits(model, config, ids)
    forms = {
        "list of 1-D": list(ids),
        "list of (1, L)": list(ids.split(1)),
        "batches of 2": [ids[:2], ids[2:]],
        "dicts without mask": [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}],
        "a generator (DataLoader-like)": (b for b in ids.split(2)),
        "right-padded": [_padded(list(ids[:2]), "right"), _padded(list(ids[2:]), "left")],
    }
    for name, calibration in forms.items():
        assert torch.equal(_logits(model, config, calibration), expected), name


def test_padding_is_dropped_left_or_right(model):
    config = serq_ao.SERQConfig(rank=32, gptq=True)
    rows = [_ids(1, length, seed)[0] for seed, length in enumerate((32, 20, 7, 27))]
    expected = _logits(model, config, rows)  # each window its real tokens only
    for side in ("right", "left"):
        assert torch.equal(_logits(model, config, [_padded(rows[:3], side), _padded(rows[3:], side)]), expected)


def test_statistics_of_windows_of_any_lengths(model):
    """max |x| per channel and the token count over windows of different lengths, against
    hooks on the float model run window by window."""
    windows = [_ids(1, length, seed) for seed, length in enumerate((32, 5, 17))]
    plan = analyze(model)
    stats = collect_statistics(model, plan, windows)
    assert stats.tokens == 32 + 5 + 17
    q_proj = model.model.layers[1].self_attn.q_proj
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].abs().amax(dim=(0, 1))))
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window, use_cache=False)
    finally:
        handle.remove()
    (group,) = [g for g in plan.groups if "model.layers.1.self_attn.q_proj" in g.linears]
    assert torch.equal(stats.amax[group.name], torch.stack(seen).amax(0))


@pytest.mark.parametrize("calibration, message", [
    ([], "holds no calibration windows"),
    ("some text", "must be input ids"),
    (42, "must be input ids"),
    ([{"ids": torch.ones(1, 4, dtype=torch.long)}],
     r"calibration\[0\] is a mapping without 'input_ids' \(keys: \['ids'\]\)"),
    ([torch.ones(2, 3, 4, dtype=torch.long)], r"calibration\[0\] must be input ids of shape \(n, L\) or \(L,\)"),
    ([{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 0, 1, 1]])}],
     "attention_mask has gaps"),
    ([{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)}], "differ in shape"),
    ([torch.ones(4, dtype=torch.long), torch.ones(4)], "calibration window 1 must hold integer token ids"),
    ([torch.ones(4, dtype=torch.long), torch.full((4,), 300)], r"calibration window 1 holds token ids in \[300, 300\]"),
    ([torch.ones(0, dtype=torch.long)], "n, L >= 1"),
])
def test_malformed_calibration_names_the_problem(model, calibration, message):
    with pytest.raises(ValueError, match=message):
        serq_ao.quantize_model(copy.deepcopy(model), serq_ao.SERQConfig(rank=32), calibration)


def test_a_tensor_gives_its_rows_as_views():
    ids = _ids(3, 8, 1)
    windows = calibration_windows(ids)
    assert len(windows) == 3 and all(w.shape == (1, 8) for w in windows)
    assert windows[1].data_ptr() == ids[1].data_ptr()
