"""Named recipes (serq_ao.quant.recipes) and the command line's --recipe."""

import json

import pytest

from serq_ao.cli.common import applied_fields
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.recipes import DEFAULT_RECIPE, RECIPES, recipe_config, recipe_options


def test_the_paper_recipe_is_serq_as_published():
    assert recipe_config("paper") == SERQConfig() == SERQConfig(method="serq")
    assert recipe_options("paper", "w4a8") == {}


@pytest.mark.parametrize("fmt, rotation, weight_scales", [("mxfp4", 32, "rule"), ("w4a8", 128, "search"),
                                                          ("w4a4", 128, "search")])
def test_rotated_gptq_rotates_the_block_that_shares_a_scale(fmt, rotation, weight_scales):
    config = recipe_config("rotated-gptq", format=fmt)
    assert config.rotation == rotation == config.quant_format.weight_group_size
    assert str(config.weight_scales) == weight_scales  # INT4's group scales by error, MXFP4's by its rule
    assert str(recipe_config("rotated-gptq", format=fmt, weight_scales="rule").weight_scales) == "rule"
    assert (config.flattening_strength, str(config.saliency_unit), config.gptq, str(config.gptq_order)) == (
        0.0, "block", True, "columns")
    assert config.rank == SERQConfig().rank and str(config.method) == "serq"


def test_options_override_the_recipe_and_misuse_is_named():
    assert DEFAULT_RECIPE in RECIPES and recipe_config() == recipe_config(DEFAULT_RECIPE)
    config = recipe_config("rotated-gptq", rank=32, rotation=64, weight_scales="search")
    assert (config.rank, config.rotation, str(config.weight_scales), config.gptq) == (32, 64, "search", True)
    # turning GPTQ or the rotation off takes the recipe's GPTQ order or block order with it
    config = recipe_config("rotated-gptq", gptq=False)
    assert (config.gptq, str(config.gptq_order), str(config.saliency_unit)) == (False, "columns", "block")
    config = recipe_config("rotated-gptq", rotation=0)
    assert (config.rotation, str(config.saliency_unit), config.gptq) == (0, "channel", True)
    with pytest.raises(ValueError, match="gptq_order='hessian' applies with gptq=True only"):
        recipe_config("rotated-gptq", gptq=False, gptq_order="hessian")  # asked for both: say so
    with pytest.raises(ValueError, match=r"recipe must be one of \('paper', 'rotated-gptq'\), got 'best'"):
        recipe_config("best")
    with pytest.raises(ValueError, match="a recipe is one of method 'serq', got method='rtn'"):
        recipe_config("paper", method="rtn")


def _quantize(main, model_dir, out, *options):
    argv = ["quantize", str(model_dir), "-o", str(out), "--rank", "32", "--calib-samples", "2", "--calib-seqlen",
            "32", "--no-diagnostics", "--quiet", "--json", *options]
    return main(argv)


def test_the_command_line_default_is_the_rotated_gptq_recipe(tiny_model_dir, tmp_path, capsys):
    from serq_ao.cli.main import main

    assert _quantize(main, tiny_model_dir, tmp_path / "default") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recipe"] == "rotated-gptq"
    config = recipe_config("rotated-gptq", rank=32)
    expected = applied_fields(config)  # --json lists the fields this method and format use, and no other
    assert {k: summary[k] for k in expected} == expected and not set(config.to_dict()) - set(expected) & set(summary)
    report = json.loads((tmp_path / "default" / "serq_report.json").read_text())
    assert report["report"]["config"] == config.to_dict()

    assert _quantize(main, tiny_model_dir, tmp_path / "paper", "--recipe", "paper") == 0
    summary = json.loads(capsys.readouterr().out)
    paper = applied_fields(SERQConfig(rank=32))  # no GPTQ, so no gptq_order
    assert summary["recipe"] == "paper" and {k: summary[k] for k in paper} == paper and "gptq_order" not in summary

    # an option given overrides the recipe's
    assert _quantize(main, tiny_model_dir, tmp_path / "nogptq", "--no-gptq") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["gptq"], summary["rotation"], summary["flattening_strength"]) == (False, 32, 0.0)
    assert "gptq_order" not in summary  # no GPTQ: its order does not apply


def test_recipe_misuse_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    from serq_ao.cli.main import main

    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--quiet", "--method", "rtn",
                 "--recipe", "paper"]) == 2
    assert "--recipe applies to method serq only" in capsys.readouterr().err
    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--quiet", "--method", "rtn",
                 "--gptq-order", "hessian"]) == 2
    assert "--gptq-order applies with GPTQ only" in capsys.readouterr().err
    assert _quantize(main, tiny_model_dir, tmp_path / "r", "--no-gptq", "--gptq-order", "hessian") == 2
    assert "--gptq-order applies with GPTQ only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--recipe", "best"])
    assert "--recipe: invalid choice: 'best'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_compare_applies_the_recipe_to_serq_only(tiny_model_dir, capsys):
    from serq_ao.cli.main import main

    argv = ["compare", str(tiny_model_dir), "--methods", "rtn,serq", "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--windows", "1", "--seqlen", "32", "--quiet", "--json"]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["serq"]["recipe"] == "rotated-gptq" and rows["rtn"]["recipe"] is None
    assert rows["serq"]["config"] == applied_fields(recipe_config(rank=32))
    assert rows["rtn"]["config"] == applied_fields(SERQConfig(method="rtn", rank=32))
