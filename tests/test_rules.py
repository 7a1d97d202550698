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


def test_vit_heads_come_from_the_named_family_or_open_clips_widths():
    """Not width // 80: ViT-H has 16 heads of 80, ViT-L 16 of 64, ViT-B 12 of 64, ViT-bigG 16 of 104."""
    from e4t.published import vit_heads
    assert vit_heads(1280, "ViT-H-14/laion2b_s32b_b79k") == 16
    assert vit_heads(1024, "ViT-L-14/openai") == 16 and vit_heads(768, "ViT-B-16/laion2b") == 12
    assert vit_heads(1664, "hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k") == 16
    assert vit_heads(1024) == 16 and vit_heads(768) == 12          # a folder that names no model: open_clip's widths
    assert vit_heads(80, "ViT-H-14") == 1                            # the tests' tiny ViT-H-shaped backbone
    with pytest.raises(e4t.E4TFileError, match="clip_model_name_or_path"):
        vit_heads(100, "convnext_base")


def test_a_published_folder_gets_its_backbones_head_count(tmp_path):
    """A published folder whose config names ViT-L gets 16 heads of 64 (the old width // 80 gave 12)."""
    import json
    import torch
    from e4t.published import infer_encoder_config
    sd = {"clip_vision.conv1.weight": torch.zeros(1024, 3, 14, 14), "clip_vision.positional_embedding": torch.zeros(257, 1024),
          "clip_vision.transformer.resblocks.0.ln_1.weight": torch.zeros(1024),
          "unet_feature_embedder.0.weight": torch.zeros(8, 40), "final_linear.weight": torch.zeros(768, 8)}
    (tmp_path / "config.json").write_text(json.dumps({"clip_model_name_or_path": "ViT-L-14::openai"}))
    cfg = e4t.read_published_config(str(tmp_path))
    assert infer_encoder_config(sd, backbone_id=cfg.backbone_id).vit_heads == 16
