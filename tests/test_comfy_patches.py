"""E4T offsets as ComfyUI weight patches: order with LoRA, exact removal, the adapter as dynamic VRAM calls it."""
import pytest
import torch

from comfy_harness import Host
from test_comfyui import pack_module
from tiny_models import tiny_model

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def host():
    return Host()


def lora_for(model, key, rank=2, seed=0):
    """A kohya-style LoRA file content for one weight, and its ΔW at strength 1."""
    g = torch.Generator().manual_seed(seed)
    w = model.model_state_dict()[key]
    up, down = torch.randn(w.shape[0], rank, generator=g) * 0.1, torch.randn(rank, w.shape[1], generator=g) * 0.1
    name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
    return {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(float(rank))}, up @ down


def deltas_for(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = model.model_state_dict()
    return {KEY[len("diffusion_model."):]: torch.randn(sd[KEY].shape, generator=g) * 0.2}


def patch_tolerance(model):
    """ComfyUI computes weight patches in its lora_compute_dtype: fp32 on the CPU, fp16 on most GPUs."""
    import comfy.model_management as mm
    compute = mm.lora_compute_dtype(model.load_device) if hasattr(mm, "lora_compute_dtype") else torch.float32
    return dict(rtol=1e-5, atol=1e-6) if compute == torch.float32 else dict(rtol=2e-3, atol=2e-4)


def patched_weight(m):
    m.patch_model()
    try:
        return m.model.state_dict()[KEY].clone()
    finally:
        m.unpatch_model()


@pytest.mark.parametrize("e4t_first", [False, True])
def test_offsets_stack_with_lora_in_graph_order_and_unpatch_exactly(host, e4t_first):
    import comfy.sd
    patches = pack_module("nodes.patches")
    model = tiny_model(seed=4, disable_dynamic=True, dtype=torch.float32)   # the baked path, exact
    w0 = model.model.state_dict()[KEY].clone()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    lora, d_lora = lora_for(model, KEY)
    deltas = deltas_for(model)
    d = deltas[KEY[len("diffusion_model."):]]
    if e4t_first:
        m = model.clone()
        patches.add_e4t_patches(m, deltas, {}, 0.5)
        m = comfy.sd.load_lora_for_models(m, None, lora, 0.7, 0.0)[0]
        want = w0 * (1 + 0.5 * d) + 0.7 * d_lora
    else:
        m = comfy.sd.load_lora_for_models(model, None, lora, 0.7, 0.0)[0]
        m = m.clone()
        patches.add_e4t_patches(m, deltas, {}, 0.5)
        if patches.WeightAdapterBase is not None:       # exact: scales the weight as accumulated
            want = (w0 + 0.7 * d_lora) * (1 + 0.5 * d)
        else:                                           # 2024 host: precomputed diff on the base weight
            want = w0 + 0.7 * d_lora + 0.5 * w0 * d
    torch.testing.assert_close(patched_weight(m).cpu(), want, **patch_tolerance(m))
    for k, v in model.model.state_dict().items():
        assert torch.equal(v.cpu(), before[k].cpu()), f"{k} not restored"


def test_offsets_computed_while_another_clone_is_patched(host):
    """Clones share one module; a loaded clone's patches stay in it. New offsets must still scale the base."""
    patches = pack_module("nodes.patches")
    model = tiny_model(seed=6, disable_dynamic=True, dtype=torch.float32)
    w0 = model.model.state_dict()[KEY].clone()
    deltas = deltas_for(model)
    d = deltas[KEY[len("diffusion_model."):]]
    first = model.clone()
    patches.add_e4t_patches(first, deltas, {}, 1.0)
    first.patch_model()
    second = model.clone()
    patches.add_e4t_patches(second, deltas, {}, 0.5)
    first.unpatch_model()
    torch.testing.assert_close(patched_weight(second).cpu(), w0 * (1 + 0.5 * d), **patch_tolerance(second))


@pytest.mark.comfy_feature("comfy/weight_adapter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_called_like_the_dynamic_vram_patcher(host, dtype):
    """LowVramPatch runs comfy.lora.calculate_weight per layer call on the weight in its compute
    dtype: LoRA patch first, then ours; the result is (W + ΔLoRA)(1 + sΔW) and ours writes nothing in place."""
    import comfy.lora
    import comfy.sd
    patches = pack_module("nodes.patches")
    model = tiny_model(seed=5)
    lora, d_lora = lora_for(model, KEY)
    deltas = deltas_for(model)
    d = deltas[KEY[len("diffusion_model."):]]
    m = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0].clone()
    patches.add_e4t_patches(m, deltas, {}, 0.8)
    entries = m.patches[KEY]
    ours = entries[-1][1]
    assert isinstance(ours, patches.E4TOffsetAdapter)
    rebuilt = type(ours)(ours.loaded_keys, ours.weights)            # as the core rebuilds adapters
    assert rebuilt.calculate_shape(KEY) is None
    w = model.model.state_dict()[KEY].to(dtype)
    keep = w.clone()
    out = comfy.lora.calculate_weight(entries[:-1] + [(0.8, rebuilt) + tuple(entries[-1][2:])], w.clone(), KEY,
                                      intermediate_dtype=dtype)
    want = (keep.float() + d_lora) * (1 + 0.8 * d)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-3)
    alone = rebuilt.calculate_weight(w, KEY, 0.8, 1.0, None, lambda a: a, dtype)
    assert torch.equal(w, keep), "the adapter wrote into the weight it was given"
    torch.testing.assert_close(alone.float(), keep.float() * (1 + 0.8 * d), rtol=2e-2, atol=2e-3)


def test_in_place_residuals_are_found_by_running_the_hosts_block(host):
    """`e4t.training.residuals_in_place` answers from behaviour (neither source text nor version): autograd refuses a
    backward through this ComfyUI's own transformer block exactly when the probe says its residuals are in place,
    and the LayerNorm copies `training_mode` then adds make that backward work."""
    import copy
    from e4t.training import residuals_in_place, training_mode
    unet = tiny_model().model.diffusion_model
    block = copy.deepcopy(next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")).float()
    dim, ctx_dim = block.norm1.normalized_shape[0], block.attn2.to_k.in_features

    def backward():
        x = torch.randn(1, 4, dim, requires_grad=True)
        block(x * 1, torch.randn(1, 3, ctx_dim)).sum().backward()
    with torch.inference_mode(False), torch.enable_grad():
        try:
            backward()
            refused = False
        except RuntimeError as err:
            assert "inplace" in str(err)
            refused = True
    assert residuals_in_place(unet) == refused
    with training_mode(block):                   # None: the probe decides, and the copies make it work
        backward()


def test_e4t_object_reads_without_side_effects_and_refuses_a_second_backbone(host, tmp_path):
    """`E4T.deltas()` leaves the loaded offsets' dtype alone; a CLIP_VISION that differs from the backbone in use is
    refused with what to do (before: silently ignored), an identical one is accepted."""
    import e4t
    from tiny_models import write_published
    E4T = pack_module("nodes.model").E4T
    write_published(tmp_path / "pub")
    weights = e4t.load(str(tmp_path / "pub"))
    weights.offsets.half()
    obj = E4T(weights, "tiny")
    deltas = obj.deltas()
    assert all(p.dtype == torch.float16 for p in weights.offsets.parameters())
    assert all(d.dtype == torch.float32 for d in deltas.values())
    same = {k: v.clone() for k, v in weights.encoder.state_dict().items()}
    obj.use_stock_backbone(same)
    other = {k: v + (0.5 if k.endswith("conv1.weight") else 0) for k, v in same.items()}
    with pytest.raises(pack_module("e4t.files").E4TFileError, match="disconnect CLIP_VISION"):
        obj.use_stock_backbone(other)
