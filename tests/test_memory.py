"""The CPU memory estimate (e4t.memory): live-bytes accounting of known tensor programs, and a tiny tune's
estimate against the byte counts the test computes from the models itself."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import e4t
from e4t import memory
from e4t.memory import LiveBytes, rounded

pytestmark = pytest.mark.skipif(memory.supported() is not None, reason=str(memory.supported()))


def test_rounding_is_the_cuda_allocators():
    assert [rounded(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]


def test_known_program():
    """Allocations, views, frees and the peak of a program whose bytes are known."""
    mode = FakeTensorMode()
    live = LiveBytes(mode)
    with mode, live:
        a = torch.empty(1000)                      # 4000 B -> 4096
        b = a * 2                                  # 4096
        v = b[:10]                                 # a view: no new storage
        assert (live.now, live.peak) == (8192, 8192)
        del a
        assert live.now == 4096
        c = torch.empty(100, dtype=torch.float16)  # 200 B -> 512
        assert (live.now, live.peak) == (4608, 8192)
        del b
        assert live.now == 4608                    # the view keeps b's storage alive
        del v, c
        assert live.now == 0
        x = torch.empty(256, 256, requires_grad=True)              # 256 KiB
        y = (x * 2).relu()                         # 256 KiB each
        assert live.now == 2 * 2**18               # x and relu's output (kept for its backward); mul's is freed
        y.sum().backward()
        assert live.now == 3 * 2**18               # + x.grad; the scalar sum is gone with its graph
        assert live.peak >= 4 * 2**18              # relu's gradient and x.grad alive at once in backward
        peak = live.peak
        elsewhere = torch.empty(2**20)             # 4 MiB: counted, then declared held off the device
        live.ignore(elsewhere)
        elsewhere.mul_(2)                          # an in-place result is the same storage: still not counted
        assert live.now == 3 * 2**18 and live.peak == max(peak, 3 * 2**18 + 2**22)


def test_tune_estimate_tiny(unet, clip):
    """A tiny tune (fast mode, trains all): trainable copies, optimizer state and what is resident equal the
    byte counts computed here from the models; the peak holds them plus activations; bf16 moments halve the optimizer state; a repeat comes from the cache."""
    from tiny_models import text_model, tiny_encoder_config
    from e4t_standalone.comfy_models import in_place_residuals
    text = text_model(clip)
    enc_cfg = tiny_encoder_config()
    cfg = e4t.TuneConfig(batch_size=4, resolution=64, trains="all")
    est = memory.estimate_tune_peak(unet, cfg, text_model=text, encoder_config=enc_cfg,
                                    clone_norm_inputs=in_place_residuals())
    heads = e4t.Encoder(enc_cfg).stack_first_linears().heads()          # the tune's layout: first_linears stacked
    offsets = list(e4t.OffsetGroups(e4t.Offsets(e4t.targets(unet.state_dict()), identity=False)).parameters())
    # the U-Net's fp32 copies in three flat tensors: weights merged with the offsets, linear and conv layers, the rest
    merged = set(e4t.targets(unet.state_dict()))
    layers = {n for n, _ in unet.named_parameters() if n not in merged and isinstance(
        unet.get_submodule(n.rpartition(".")[0]), (torch.nn.Linear, torch.nn.Conv2d))}
    flat = [sum(p.numel() for n, p in unet.named_parameters() if (n in merged, n in layers) == kind)
            for kind in ((True, False), (False, True), (False, False))]
    assert all(flat) and sum(flat) == sum(p.numel() for p in unet.parameters())
    fp32 = sum(rounded(4 * p.numel()) for p in heads + offsets) + sum(rounded(4 * n) for n in flat)
    assert est.breakdown["trainable"] == fp32
    assert est.breakdown["optimizer"] == 2 * fp32                    # AdamW: exp_avg, exp_avg_sq in fp32
    fp16 = lambda ps: sum(rounded(2 * p.numel()) for p in ps)   # noqa: E731
    other = rounded(4 * enc_cfg.n_tokens * enc_cfg.vit_width) + rounded(2 * 77 * enc_cfg.word_dim) \
        + rounded(4 * enc_cfg.word_dim) + rounded(4 * 3 * 64 * 64) \
        + rounded(8 * 4 * 77) + rounded(8 * 4)      # features, empty context, e_domain, image, token ids, positions
    assert est.breakdown["resident"] == fp16(unet.parameters()) + 2 * fp16(text.parameters()) + other
    assert sum(est.breakdown.values()) == est.peak
    assert est.breakdown["activations"] > 0

    lean = memory.estimate_tune_peak(unet, e4t.TuneConfig(batch_size=4, resolution=64, trains="all",
                                                          checkpointing=True, optimizer_states="bf16"),
                                     text_model=text, encoder_config=enc_cfg, clone_norm_inputs=in_place_residuals())
    # not one whole step into torch's AdamW: one leaf per U-Net weight and per first_linear (`e4t.tune.whole_step`)
    per_weight = sum(rounded(4 * p.numel()) for p in e4t.Encoder(enc_cfg).heads() + offsets + list(unet.parameters()))
    assert lean.breakdown["trainable"] == per_weight != est.breakdown["trainable"]
    # bf16 moments in flat chunks: half, less the 512-byte rounding of each fp32 moment tensor
    assert 0.45 < lean.breakdown["optimizer"] / est.breakdown["optimizer"] <= 0.5
    held = memory.estimate_tune_peak(unet, e4t.TuneConfig(batch_size=4, resolution=64, trains="all", checkpointing=True,
                                                          optimizer_states="bf16", offload_optimizer=True),
                                     text_model=text, encoder_config=enc_cfg, clone_norm_inputs=in_place_residuals())
    assert held.breakdown["optimizer"] == 0                          # moments held in CPU memory are not counted
    assert lean.peak - lean.breakdown["optimizer"] <= held.peak < lean.peak
    again = memory.estimate_tune_peak(unet, cfg, text_model=text, encoder_config=enc_cfg,
                                      clone_norm_inputs=in_place_residuals())
    assert again.peak == est.peak and again.seconds == 0.0          # cached
