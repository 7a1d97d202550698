"""Weight offsets: a rank-3 ΔW per attention projection, applied as W = W0 * (1 + ΔW) (`weight_change`).

Parametrisation of the published weights: a scalar v, linear1 (1 -> in), linear2 (1 -> out),
linear_column (in -> in) and linear_row (out -> out). With A, bA = linear_column and B, bB = linear_row:

    ΔW = (B vy)(A vx)^T + (B 1) bA^T + bB 1^T        (out, in), vx = linear1(v), vy = linear2(v)

which is what the reference computes with dense matrix products, in O(in^2 + out^2 + in*out).
Targets are q/k/v of attn1 and attn2 in every transformer block; names here are CompVis U-Net
names (`input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`), the layout both hosts use.
"""
import re
from contextlib import contextmanager

import torch
from torch import nn

PARAMS = ("v", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
          "linear_column.weight", "linear_column.bias", "linear_row.weight", "linear_row.bias")
_TARGET = re.compile(r"(.*\.transformer_blocks\.\d+\.attn[12])\.to_([qkv])\.weight$")


class Offset(nn.Module):
    """ΔW for one projection of weight shape (out, in)."""

    def __init__(self, in_dim: int, out_dim: int, identity: bool = True, device=None):
        super().__init__()
        self.v = nn.Parameter(torch.ones(1, device=device))
        self.linear1 = nn.Linear(1, in_dim, device=device)
        self.linear2 = nn.Linear(1, out_dim, device=device)
        self.linear_column = nn.Linear(in_dim, in_dim, device=device)
        self.linear_row = nn.Linear(out_dim, out_dim, device=device)
        if identity:  # ΔW = 0; the published init instead rescales every weight by about ±20 %
            nn.init.zeros_(self.linear_row.weight)
            nn.init.zeros_(self.linear_row.bias)

    def delta(self) -> torch.Tensor:
        return grouped_deltas([self])[0]                                           # (out, in)


def grouped_deltas(offsets: list) -> torch.Tensor:
    """ΔW of g offsets of one shape, stacked (g, out, in). The vector work and the final outer products
    run once per group, not per offset: fewer kernels. The matrices stay where they are, with no stacked copy
    (sampling runs this once per load, on memory the host counts); a tune trains `OffsetGroups` instead."""
    def stacked(get):
        return torch.stack([get(o) for o in offsets])
    v = stacked(lambda o: o.v)                                                     # (g, 1)
    vx = stacked(lambda o: o.linear1.weight.squeeze(1)) * v + stacked(lambda o: o.linear1.bias)  # (g, in)
    vy = stacked(lambda o: o.linear2.weight.squeeze(1)) * v + stacked(lambda o: o.linear2.bias)  # (g, out)
    col = torch.stack([o.linear_column.weight @ x for o, x in zip(offsets, vx.unbind())])     # (g, in)
    row = torch.stack([o.linear_row.weight @ y for o, y in zip(offsets, vy.unbind())])        # (g, out)
    return _outer(col, row, stacked(lambda o: o.linear_row.weight.sum(1)), stacked(lambda o: o.linear_column.bias),
                  stacked(lambda o: o.linear_row.bias))


def _outer(col, row, row_sum, col_bias, row_bias) -> torch.Tensor:
    """ΔW = (B vy)(A vx)^T + (B 1) bA^T + bB 1^T from col = A vx (g, in), row = B vy, row_sum = B 1 (g, out)."""
    return row[:, :, None] * col[:, None, :] + row_sum[:, :, None] * col_bias[:, None, :] + row_bias[:, :, None]


def _slot(target: str) -> str:
    return target.replace(".", "__")


def _unslot(key: str):
    """`offsets.<slot>.<param>` -> (target, param)."""
    slot, param = key[len("offsets."):].split(".", 1)
    return slot.replace("__", "."), param


class Offsets(nn.Module):
    """All offsets of one U-Net, keyed by the CompVis name of the weight each one modulates."""

    def __init__(self, shapes: dict, identity: bool = True, device=None):
        """shapes: {target weight name: (out, in)}, e.g. from `targets(unet.state_dict())`."""
        super().__init__()
        self.targets = sorted(shapes)
        self.offsets = nn.ModuleDict({_slot(k): Offset(shapes[k][1], shapes[k][0], identity, device)
                                      for k in self.targets})

    def __getitem__(self, target: str) -> Offset:
        return self.offsets[_slot(target)]

    def deltas(self) -> dict:
        """{target: ΔW}; call once per optimiser step or once per load, never per attention call."""
        out = {}
        for keys, delta in self.grouped():
            out.update(zip(keys, delta.unbind()))
        return {k: out[k] for k in self.targets}

    def grouped(self) -> list:
        """[(targets, their ΔW stacked (g, out, in))], one entry per weight shape."""
        return [(keys, grouped_deltas(modules)) for keys, modules in _by_shape(self)]


class OffsetGroups(nn.Module):
    """The offsets of one U-Net in the layout a tune trains them in: the offsets of one weight shape stacked, each
    parameter one (g, ...) tensor, so ΔW of all targets takes a few kernels forward and backward, and the optimizer
    and gradient clipping see 9 tensors per shape instead of 9 per target. The same maths as `Offsets`, per offset;
    `offsets()` gives them back in the file layout."""

    def __init__(self, offsets: Offsets, device=None, dtype=torch.float32):
        super().__init__()
        self.shapes = {k: tuple(offsets[k].linear2.weight.shape[:1] + offsets[k].linear1.weight.shape[:1])
                       for k in offsets.targets}
        self.keys = [keys for keys, _ in _by_shape(offsets)]
        self.stacks = nn.ModuleList()
        for keys in self.keys:
            stack = nn.ParameterDict()
            for name in PARAMS:
                with torch.no_grad():
                    tensors = torch.stack([offsets[k].get_parameter(name) for k in keys])
                stack[name.replace(".", "_")] = nn.Parameter(tensors.to(device, dtype))
            self.stacks.append(stack)

    def grouped(self) -> list:
        """[(targets, their ΔW stacked (g, out, in))], as `Offsets.grouped`."""
        out = []
        for keys, p in zip(self.keys, self.stacks):
            v = p["v"]                                                                         # (g, 1)
            vx = p["linear1_weight"][..., 0] * v + p["linear1_bias"]                           # (g, in)
            vy = p["linear2_weight"][..., 0] * v + p["linear2_bias"]                           # (g, out)
            col = torch.bmm(p["linear_column_weight"], vx[..., None])[..., 0]                  # (g, in)
            row = torch.bmm(p["linear_row_weight"], vy[..., None])[..., 0]                     # (g, out)
            out.append((keys, _outer(col, row, p["linear_row_weight"].sum(2), p["linear_column_bias"],
                                     p["linear_row_bias"])))
        return out

    def deltas(self) -> dict:
        """{target: ΔW}, as `Offsets.deltas`."""
        return {k: d for keys, delta in self.grouped() for k, d in zip(keys, delta.unbind())}

    def offsets(self) -> Offsets:
        """Detached copies in the file layout (`Offsets`)."""
        out = Offsets(self.shapes, device="meta")
        state = {f"offsets.{_slot(k)}.{name}": p[name.replace(".", "_")][i].detach().clone()
                 for keys, p in zip(self.keys, self.stacks) for i, k in enumerate(keys) for name in PARAMS}
        out.load_state_dict(state, assign=True)
        return out


def _by_shape(offsets: Offsets) -> list:
    """[(targets, [their Offset modules])], one entry per weight shape, targets in `offsets.targets` order."""
    groups = {}
    for k in offsets.targets:
        groups.setdefault(tuple(offsets[k].linear_row.weight.shape + offsets[k].linear_column.weight.shape), []).append(k)
    return [(keys, [offsets[k] for k in keys]) for keys in groups.values()]


def targets(state_dict) -> dict:
    """{CompVis weight name: (out, in)} for every attention q/k/v weight in a U-Net state dict."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if _TARGET.match(k)}


def weight_change(weight: torch.Tensor, delta: torch.Tensor | None = None, added: torch.Tensor | None = None,
                  strength: float = 1.0) -> torch.Tensor | None:
    """W' − W in fp32 for the one weight rule of E4T, W' = (W + s·D) ⊙ (1 + s·ΔW): ΔW the offset of an attention
    q/k/v weight, D a tuned concept's U-Net delta, s the strength. W is the weight as the host holds it (with any
    LoRA already in it), so the offsets scale what LoRA and tune made of it. None when neither is given."""
    if added is None and delta is None:
        return None
    change = strength * _fp32_on(added, weight) if added is not None else None
    if delta is not None:
        scaled = weight.float() if change is None else weight.float() + change
        modulation = strength * scaled * _fp32_on(delta, weight)
        change = modulation if change is None else change + modulation
    return change


def _fp32_on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 on `like`'s device, moved before it is widened (half the bytes to copy)."""
    if t.device != like.device:
        t = t.to(like.device, non_blocking=like.device.type == "cuda")
    return t.float()


def merge(weight: torch.Tensor, delta: torch.Tensor | None = None, strength: float = 1.0,
          added: torch.Tensor | None = None) -> torch.Tensor:
    """W' = W + `weight_change`, computed in fp32 and returned in the weight's dtype; never in place."""
    change = weight_change(weight, delta, added, strength)
    return weight.clone() if change is None else (weight.float() + change).to(weight.dtype)


@contextmanager
def applied(module: nn.Module, deltas: dict, strength: float = 1.0, added: dict | None = None):
    """Swap in merged weights (`merge`) for the duration of a block; the original tensors are put back untouched.
    deltas: {CompVis weight name: ΔW}; added: a tuned concept's U-Net delta {CompVis name: D}."""
    originals, added = {}, added or {}
    try:
        for key in sorted(set(deltas) | set(added)):
            owner, _, name = key.rpartition(".")
            sub = module.get_submodule(owner)
            w = originals[(sub, name)] = getattr(sub, name)
            merged = merge(w.detach(), deltas.get(key), strength, added.get(key))
            setattr(sub, name, nn.Parameter(merged, requires_grad=False))
        yield module
    finally:
        for (sub, name), param in originals.items():
            setattr(sub, name, param)


# --- names: published diffusers layout <-> CompVis layout -----------------------------------------

LAYERS_PER_BLOCK = 2               # SD1's U-Net: 2 res/attention layers per down block


def diffusers_block_to_compvis(block: str) -> str:
    """`down_blocks.1.attentions.0` -> `input_blocks.4.1`."""
    n = LAYERS_PER_BLOCK + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)", block)
    if m:
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)", block)
    if m:
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1"
    if block == "mid_block.attentions.0":
        return "middle_block.1"
    raise KeyError(f"not an SD1 attention block name: {block!r}")


def compvis_block_to_diffusers(block: str) -> str:
    """Inverse of `diffusers_block_to_compvis`."""
    n = LAYERS_PER_BLOCK + 1
    m = re.fullmatch(r"input_blocks\.(\d+)\.1", block)
    if m and int(m[1]) % n:
        i, j = divmod(int(m[1]) - 1, n)
        return f"down_blocks.{i}.attentions.{j}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.1", block)
    if m:
        i, j = divmod(int(m[1]), n)
        return f"up_blocks.{i}.attentions.{j}"
    if block == "middle_block.1":
        return "mid_block.attentions.0"
    raise KeyError(f"not an SD1 attention block name: {block!r}")


_PUBLISHED = re.compile(r"(.*)\.transformer_blocks\.(\d+)\.(attn[12])\.wo_([qkv])\.(.+)$")


def published_to_target(key: str):
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.wo_q.linear1.weight`
    -> (`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`, `linear1.weight`)."""
    m = _PUBLISHED.match(key)
    if not m or m[5] not in PARAMS:
        raise KeyError(f"not a published weight-offset key: {key!r}")
    block = diffusers_block_to_compvis(m[1])
    return f"{block}.transformer_blocks.{m[2]}.{m[3]}.to_{m[4]}.weight", m[5]


def target_to_published(target: str, param: str) -> str:
    m = _TARGET.match(target)
    block, rest = m[1].split(".transformer_blocks.")
    return f"{compvis_block_to_diffusers(block)}.transformer_blocks.{rest}.wo_{m[2]}.{param}"


def from_published(state_dict: dict) -> Offsets:
    """Build Offsets from published-layout tensors (keys as in `weight_offsets.pt`), checking every key."""
    grouped = {}
    for key, tensor in state_dict.items():
        target, param = published_to_target(key)
        grouped.setdefault(target, {})[param] = tensor
    shapes = {}
    for target, params in grouped.items():
        missing = [p for p in PARAMS if p not in params]
        if missing:
            raise KeyError(f"weight offsets for {target}: missing {', '.join(missing)}")
        shapes[target] = (params["linear2.weight"].shape[0], params["linear1.weight"].shape[0])
    offsets = Offsets(shapes, device="meta")   # no memory, no init: the file's tensors are assigned
    load_checked(offsets, {f"offsets.{_slot(t)}.{p}": v for t, ps in grouped.items() for p, v in ps.items()},
                 "weight offsets", names=lambda k: target_to_published(*_unslot(k)), assign=True)
    return offsets


def to_published(offsets: Offsets) -> dict:
    return {target_to_published(t, p): v
            for t in offsets.targets for p, v in offsets[t].state_dict().items()}


def load_checked(module: nn.Module, state_dict: dict, what: str, names=lambda key: key, assign: bool = False):
    """load_state_dict with errors that name the key (as the file names it) and the expected shape."""
    expected = module.state_dict()
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unknown:
        raise KeyError(f"{what}: unexpected key {names(unknown[0])!r} ({len(unknown)} unexpected in all)")
    if missing:
        raise KeyError(f"{what}: missing key {names(missing[0])!r} ({len(missing)} missing in all)")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{what}: key {names(key)!r} has shape {list(tensor.shape)}, expected "
                             f"{list(expected[key].shape)}: is this an SD1.x E4T file of the right size?")
    module.load_state_dict(state_dict, assign=assign)
