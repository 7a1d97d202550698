"""CompactAdamW: AdamW with fp32 / bf16 / 8-bit stored moments, stepped after or inside backward, on plain
parameters or on deltas over frozen weights. Checked against torch's AdamW and against exact zeros."""
import itertools

import pytest
import torch

import e4t
from e4t.optim import stochastic_bf16

STATES = ("fp32", "bf16", "8bit")


def run_adamw(start, grads, lr=1e-2, wd=0.01):
    """torch's AdamW, fp32: the reference path."""
    params = [p.clone().requires_grad_() for p in start]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def run_compact(start, grads, states, fused=False, delta=False, lr=1e-2, wd=0.01, chunk=1 << 23, held=None):
    """CompactAdamW on the same gradients; `delta`: trains bf16 deltas over the start values as frozen bases;
    `fused`: the gradients arrive through backward and the step runs inside it."""
    if delta:
        params = [torch.zeros_like(p, dtype=torch.bfloat16).requires_grad_() for p in start]
        bases = dict(zip(params, start))
    else:
        params, bases = [p.clone().requires_grad_() for p in start], None
    opt = e4t.CompactAdamW(params, lr=lr, weight_decay=wd, states=states, chunk=chunk, bases=bases, held=held)
    if fused:
        opt.step_in_backward()
    for step_grads in grads:
        if fused:
            opt.begin()
            torch.autograd.backward([p.float() for p in params], [g.clone() for g in step_grads])  # grad of Σ g·p
            assert opt.finished()
        else:
            for p, g in zip(params, step_grads):
                p.grad = g.clone().to(p.dtype)
            opt.step()
    weights = [(bases[p] + p.float()) if delta else p.detach() for p in params]
    return weights, opt


def random_problem(steps=15, seed=0):
    torch.manual_seed(seed)
    start = [torch.randn(64, 48) * 0.05, torch.randn(7) * 0.05, torch.randn(3, 5, 2, 2) * 0.05]
    grads = [[torch.randn_like(p) * (1 + s) for p in start] for s in range(steps)]
    return start, grads


@pytest.mark.parametrize("states,fused,delta", list(itertools.product(STATES, (False, True), (False, True))))
def test_compact_adamw_follows_adamw(states, fused, delta):
    """15 steps land where torch's AdamW lands, to a small fraction of the distance travelled, for every stored
    precision, stepped after or inside backward, on plain parameters or on deltas (bf16) over frozen weights."""
    start, grads = random_problem()
    ref, _ = run_adamw(start, grads)
    got, opt = run_compact(start, grads, states, fused, delta, chunk=1000)        # several buckets
    tolerance = {"fp32": 1e-5, "bf16": 5e-3, "8bit": 3e-2}[states] + (1e-2 if delta else 0)
    for r, g, p0 in zip(ref, got, start):
        travelled = (r - p0).norm()
        assert travelled > 0.05
        assert (g - r).norm() < tolerance * travelled, (states, fused, delta, float((g - r).norm() / travelled))
        cos = torch.nn.functional.cosine_similarity((g - p0).flatten(), (r - p0).flatten(), dim=0)
        assert cos > 0.999 if states != "8bit" else cos > 0.995


def test_state_bytes_per_parameter():
    start, grads = random_problem(steps=1)
    n = sum(p.numel() for p in start)
    sizes = {s: run_compact(start, grads, s)[1].state_bytes() / n for s in STATES}
    assert sizes["fp32"] == 8 and sizes["bf16"] == 4
    assert 2 <= sizes["8bit"] < 2.2                 # one byte per moment plus a scale per 256 values and padding


@pytest.mark.parametrize("states,fused,delta", list(itertools.product(STATES, (False, True), (False, True))))
def test_exact_zeros_stay_finite(states, fused, delta):
    """Zero gradients, zero moments, zero weights (identity offsets), denormals and negative zeros: the bug this
    guards against turned +0.0 minus one rounding step into a NaN bit pattern."""
    tiny = torch.finfo(torch.float32).tiny
    start = [torch.zeros(300), torch.full((300,), tiny / 8), torch.tensor([-0.0, 0.0, 1e-3, -1e-3] * 50)]
    grads = [[torch.zeros(300), torch.full((300,), tiny / 4), torch.tensor([0.0, -0.0, tiny / 2, -tiny / 2] * 50)]
             for _ in range(20)]
    grads[3][0][::2] = 1e-3                                                     # some values start moving, late
    got, opt = run_compact(start, grads, states, fused, delta, chunk=256)
    for w in got:
        assert torch.isfinite(w).all(), (states, fused, delta)
    for p in opt.param_groups[0]["params"]:
        m, v = opt.moments(p)
        assert torch.isfinite(m).all() and torch.isfinite(v).all() and (v >= 0).all()
    assert torch.equal(got[0][1::2], torch.zeros(150))                          # never a gradient, decay of 0: 0
    assert opt.finite is None or bool(opt.finite)


def test_stochastic_bf16_keeps_zero_sign_and_specials_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-42, -1e-42, float("inf"), -float("inf"), float("nan"), 1.0, -2.5])
    out = stochastic_bf16(special.repeat(1000), g).float().view(1000, -1)
    assert (out[:, 0] == 0).all() and not torch.signbit(out[:, 0]).any()
    assert (out[:, 1] == 0).all() and torch.signbit(out[:, 1]).all()
    assert torch.isfinite(out[:, 2:4]).all() and (out[:, 2] >= 0).all() and (out[:, 3] <= 0).all()
    assert (out[:, 4] == float("inf")).all() and (out[:, 5] == -float("inf")).all() and out[:, 6].isnan().all()
    assert (out[:, 7] == 1).all() and (out[:, 8] == -2.5).all()
    x = torch.full((200_000,), 1.0 + 2 ** -10)                                   # a quarter of a bf16 step above 1
    assert abs(float(stochastic_bf16(x, g).float().mean()) - (1.0 + 2 ** -10)) < 2e-5
    assert abs(float(stochastic_bf16(-x, g).float().mean()) + (1.0 + 2 ** -10)) < 2e-5


@pytest.mark.parametrize("states", ("bf16", "8bit"))
def test_second_moment_is_unbiased_over_a_long_run(states):
    """v moves by 0.1 % a step, finer than the stored resolution: rounded to nearest it would drift; stochastic
    rounding keeps it on torch's AdamW's value on average (8 bits: each value wanders more, hence more values)."""
    torch.manual_seed(0)
    n = 4000 if states == "bf16" else 40000
    start = torch.randn(n)
    ref, compact = start.clone().requires_grad_(), start.clone().requires_grad_()
    opts = torch.optim.AdamW([ref], lr=1e-3), e4t.CompactAdamW([compact], lr=1e-3, states=states)
    for _ in range(500):
        g = torch.randn(n)
        ref.grad, compact.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    v_ref, v = opts[0].state[ref]["exp_avg_sq"], opts[1].moments(compact)[1]
    assert abs(((v - v_ref) / v_ref).mean()) < 0.005


def test_fused_step_holds_no_full_set_of_gradients():
    """Inside backward each bucket is updated and its gradients freed as soon as they are complete."""
    params = [torch.randn(1000).requires_grad_() for _ in range(8)]
    opt = e4t.CompactAdamW(params, lr=1e-3, states="8bit", chunk=2000).step_in_backward()
    held = []
    for p in params:                         # runs after the optimizer's own hook: counts gradients still alive
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    for _ in range(2):
        opt.begin()
        x = params[0]
        for p in params[1:]:
            x = x * 0.5 + p                                     # gradients complete one parameter at a time
        x.sum().backward()
        assert opt.finished()
    assert max(held) <= 2 and all(p.grad is None for p in params)


def test_fp16_overflow_skips_the_bucket_and_the_retry_updates_only_what_was_left():
    params = [torch.zeros(300).requires_grad_() for _ in range(3)]
    opt = e4t.CompactAdamW(params, lr=1e-2, weight_decay=0.0, states="fp32", chunk=300).step_in_backward()
    grads = [torch.ones(300), torch.full((300,), float("inf")), torch.ones(300)]
    opt.begin()
    opt.loss_scale = 1024.0
    torch.autograd.backward(params, grads)
    assert not opt.finished()                                     # the middle bucket overflowed
    moved = [bool((p != 0).any()) for p in params]
    assert moved == [True, False, True]
    first = params[0].detach().clone()
    opt.begin()
    opt.loss_scale = 512.0
    torch.autograd.backward(params, [torch.ones(300)] * 3)        # the retry: only the skipped bucket moves
    assert opt.finished()
    assert torch.equal(params[0].detach(), first) and bool((params[1] != 0).all())
    torch.testing.assert_close(params[1].detach(), params[0].detach())   # the same update, from the same gradient


def test_unknown_states_are_refused():
    with pytest.raises(ValueError, match="optimizer_states"):
        e4t.CompactAdamW([torch.zeros(3, requires_grad=True)], states="int4")


def test_an_update_in_pieces_is_the_same_update(monkeypatch):
    """A bucket's update runs PIECE elements at a time (its fp32 temporaries are a piece's, not a 30 M-element
    weight's): the same weights and moments as in one piece (fp32 moments: exact), and 8-bit moments are read back
    where each piece stored them (a piece boundary inside a tensor, moments of a tensor that starts mid-block)."""
    start, grads = random_problem(steps=4)
    whole, _ = run_compact(start, grads, "fp32")
    monkeypatch.setattr(e4t.optim, "PIECE", 512)                   # the 3072-element weight in six pieces
    pieces, _ = run_compact(start, grads, "fp32")
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces))
    exact = run_compact(start, grads, "fp32")[1]
    quantized = run_compact(start, grads, "8bit")[1]
    for i in (0, 1):                                                  # the 7-vector starts at element 3072 of 3091
        p, q = exact._group["params"][i], quantized._group["params"][i]
        for a, b in zip(exact.moments(p), quantized.moments(q)):
            assert a.shape == b.shape == p.shape
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_moments_held_elsewhere_give_the_same_tune():
    """held="cpu" keeps the moments in CPU memory and moves a piece at a time to the parameters' device; on a CPU the
    path (copies in and out of the held buffers) must give exactly the same weights and moments."""
    start, grads = random_problem(steps=4)
    for states in STATES:
        here, opt_a = run_compact(start, grads, states, fused=True, delta=True)
        held, opt_b = run_compact(start, grads, states, fused=True, delta=True, held="cpu")
        assert all(torch.equal(a, b) for a, b in zip(here, held))
        assert opt_a.state_bytes() == opt_b.state_bytes()


def test_fp32_paths_step_with_torchs_fused_adamw_on_the_cpu():
    """The fast tune and pre-training use torch's AdamW fused where torch has it (here, on the CPU): one kernel
    instead of ~10 operations per parameter, landing where torch's default lands."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(40, 30, generator=g), torch.randn(30, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(10)]
    fused = [p.clone().requires_grad_() for p in start]
    default = [p.clone().requires_grad_() for p in start]
    opts = (e4t.optim.adamw(fused, "cpu", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
            torch.optim.AdamW(default, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1))
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    for step in grads:
        for params, opt in zip((fused, default), opts):
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
    for a, b, s in zip(fused, default, start):
        assert (a - s).abs().max() > 0.05                          # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
