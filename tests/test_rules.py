"""Rules both hosts take from the engine: CLIP skip as a layer count, what a tune leaves out."""
import pytest

import e4t


@pytest.mark.parametrize("last, n", [(None, None), (-1, 12), (-2, 11), (-12, 1), (0, 1), (11, 12)])
def test_clip_skip_counts_layers_like_both_hosts(last, n):
    """ComfyUI's CLIP Set Last Layer -2 and A1111's Clip skip 2 (passed as -2) both run 11 of 12 layers."""
    assert e4t.clip_layers(12, last) == n


@pytest.mark.parametrize("last", [-13, 12])
def test_clip_skip_past_the_encoder_is_refused(last):
    with pytest.raises(ValueError, match="12 layers"):
        e4t.clip_layers(12, last)


def test_a_tune_names_what_it_leaves_out():
    assert e4t.base_weights_notice([]) is None
    line = e4t.base_weights_notice(["LoRA 'style'", "LoRA 'detail'"])
    assert "base checkpoint" in line and "LoRA 'style', LoRA 'detail'" in line


def test_one_tune_lambda_and_the_file_records_the_pretraining_one(tmp_path):
    """λ: TuneConfig's is the one tune default (hosts and CLI show it); an E4T file's `reg_lambda` records the λ its
    encoder was pre-trained with, PretrainConfig's unless the file says otherwise."""
    import json
    assert e4t.TuneConfig().reg_lambda == 1e-4 == e4t.preset("published").reg_lambda
    assert e4t.DomainConfig().reg_lambda == e4t.PretrainConfig().reg_lambda == 0.01
    (tmp_path / "config.json").write_text(json.dumps({"placeholder_token": "*s"}))
    assert e4t.read_published_config(str(tmp_path)).reg_lambda == e4t.PretrainConfig().reg_lambda
    (tmp_path / "config.json").write_text(json.dumps({"reg_lambda": 1e-4, "pretrained_args": {"reg_lambda": 0.02}}))
    assert e4t.read_published_config(str(tmp_path)).reg_lambda == 0.02
