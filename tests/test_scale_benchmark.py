"""benchmarks/scale.py: its synthetic checkpoints load, are sharded, and bad options are refused."""

import sys

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def scale():
    with benchmark_script("scale") as module:
        yield module


TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def test_build_model_is_sharded_and_loads(scale, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = scale.build_model(tmp_path / "tiny", 2, shape=TINY, max_shard_size="50KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").is_file()
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert not model.config.tie_word_embeddings
    assert len(AutoTokenizer.from_pretrained(folder)("ab", add_special_tokens=False)["input_ids"]) == 2
    facts = scale.checkpoint_facts(folder)
    assert facts["params"] == sum(p.numel() for p in model.parameters())
    # a second build reuses the folder; the same seed gives the same weights elsewhere
    assert scale.build_model(folder, 2, shape=TINY) == folder
    again = scale.build_model(tmp_path / "again", 2, shape=TINY, max_shard_size="50KB")
    assert all((again / f.name).read_bytes() == f.read_bytes() for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("depths", ["4,x", "0,4", "4,4", "-1", ""])
def test_bad_depths_are_refused(scale, depths, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scale.build_parser().parse_args(["--depths", depths])
    assert exit_info.value.code == 2
    assert "--depths" in capsys.readouterr().err


def test_options(scale):
    args = scale.build_parser().parse_args(["--depths", "8,4", "--methods", "serq+gptq,rtn"])
    assert args.depths == [4, 8] and args.methods == ["serq+gptq", "rtn"]
    with pytest.raises(SystemExit):
        scale.build_parser().parse_args(["--methods", "gptq"])


def test_measure_reads_the_childs_peak(scale, tmp_path):
    record = scale.measure([sys.executable, "-c", "x = bytearray(200 * 2**20); print('{\"ok\": 1}')"],
                           tmp_path / "log")
    assert record["returncode"] == 0 and record["summary"] == {"ok": 1}
    assert 200 * 2**20 < record["peak_rss_bytes"] < 260 * 2**20  # not the pytest process's peak


def test_watchdog_cap_kills_past_the_cap(scale, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["child_memory"], "_own_cgroup_v2", lambda: None)  # what scale measures with
    cap = scale.Cap(100 * 2**20)
    assert cap.mode == "watchdog"
    code = "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(5)"
    record = scale.measure([sys.executable, "-c", code], tmp_path / "log", cap)
    assert record["killed_by_watchdog"] and not record["within_cap"] and record["returncode"] == -9


def test_linear_fit(scale):
    fit = scale.linear_fit([4, 8, 16], [10 + 2 * d for d in (4, 8, 16)])
    assert fit["seconds_per_layer"] == pytest.approx(2) and fit["intercept_s"] == pytest.approx(10)
    assert fit["r2"] == pytest.approx(1)
