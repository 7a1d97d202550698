"""Rows of a batched U-Net call whose down/mid outputs are already known (the refinement's shared pass).

With CFG and an empty negative prompt, the host's unconditional rows run the U-Net on the latent, at the
timestep and with the empty context of the encoder's feature pass, so their down/mid outputs are the maps that
pass has just computed. `KnownRows` lets one host call skip that work through the host's own forward: every
unit (a block, or the layers of a block) computes only the other rows, and a unit's output gets the known rows
spliced back in at their place. Every layer of an SD U-Net works on each sample alone (group norms and attention
are per sample), so the output equals the full batch's to float rounding; the up path runs on the whole batch.

Why not run the unconditional rows first, alone, and keep their maps: that is two U-Net passes of a part of the
batch each, which costs more than one pass of all rows wherever a pass has a fixed cost (kernel launches on a
GPU, fresh activation pages on a CPU); here the operations are those of the separate feature pass, the FLOPs
those of plain sampling.
"""
import torch
from torch import nn


class KnownRows:
    """For one call of batch `batch`: rows `rows` (a slice) are known at the outputs of some units.

    units: [(module, known output or None)] in call order. Every unit's tensor arguments whose first dimension is
    `batch` are narrowed to the other rows (a unit inside a block whose input is already narrowed still gets its
    per-sample arguments narrowed: the timestep embedding, the context); a unit with a known output returns its
    rows spliced with it, so the next block sees the whole batch again. `spliced` counts the splices made.
    """

    def __init__(self, units: list, batch: int, rows: slice):
        self.units, self.batch, self.rows, self.spliced = units, batch, rows, 0
        self.handles = []

    @classmethod
    def down_path(cls, unet: nn.Module, maps: list, batch: int, rows: slice) -> "KnownRows":
        """Units for a CompVis-layout U-Net: the layers of every input block and of the middle block, the last
        layer of each with its block's map (`e4t.unet_features`). Layers, not blocks: ComfyUI calls a block's
        layers directly, A1111 through the block's forward; both call each layer as a module."""
        blocks = list(unet.input_blocks) + [unet.middle_block]
        if len(maps) != len(blocks):
            raise ValueError(f"{len(maps)} maps for {len(blocks)} down/mid blocks")
        units = []
        for block, known in zip(blocks, maps):
            layers = list(block.children())
            units += [(layer, None) for layer in layers[:-1]] + [(layers[-1], known)]
        return cls(units, batch, rows)

    def install(self) -> "KnownRows":
        for module, known in self.units:
            self.handles.append(module.register_forward_pre_hook(self._narrow, with_kwargs=True))
            if known is not None:
                self.handles.append(module.register_forward_hook(self._splice(known)))
        return self

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _others(self, t: torch.Tensor) -> torch.Tensor:
        start, stop = self.rows.start, self.rows.stop
        if start == 0:
            return t[stop:]
        if stop == self.batch:
            return t[:start]
        return torch.cat([t[:start], t[stop:]])

    def _narrow(self, module: nn.Module, args: tuple, kwargs: dict):
        def narrow(a):
            return self._others(a) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == self.batch else a
        return tuple(map(narrow, args)), {k: narrow(v) for k, v in kwargs.items()}

    def _splice(self, known: torch.Tensor):
        def splice(module, args, out):
            if not isinstance(out, torch.Tensor) or out.shape[0] != self.batch - (self.rows.stop - self.rows.start):
                return None                           # a call this unit was not narrowed for: left whole
            self.spliced += 1
            return torch.cat([out[:self.rows.start], known.to(out), out[self.rows.start:]])
        return splice
