"""Prompts with a placeholder: where its slot is, and CLIP encodings with a word vector in that slot.

The placeholder (default "*s", two tokens in the stock SD1 tokenizer) is replaced by one marker token
that does not occur elsewhere in the prompt; that slot later receives the word vector w, which
ComfyUI's own encoder splices in (emphasis, CLIP skip and long prompts keep working).
"""
import collections

import torch

from ..e4t import MARKERS, validate

def _ids(clip, text):
    return [t[0] for chunk in clip.tokenize(text)["l"] for t in chunk]


class PlaceholderPrompt:
    """Tokens of a prompt plus the (chunk, index) slots of its placeholder."""

    def __init__(self, clip, text: str, placeholder: str):
        placeholder = validate.placeholder(placeholder)
        self.text, self.placeholder = text, placeholder
        special = set(_ids(clip, ""))
        others = set(_ids(clip, text.replace(placeholder, " ")))
        for word in MARKERS:
            ids = [i for i in _ids(clip, word) if i not in special]
            if len(ids) == 1 and ids[0] not in others:
                self.marker = ids[0]
                break
        else:
            raise ValueError("E4T: no free marker token for the placeholder in this prompt")
        self.tokens = clip.tokenize(text.replace(placeholder, f" {word} "))
        self.slots = [(c, i) for c, chunk in enumerate(self.tokens["l"]) for i, t in enumerate(chunk)
                      if t[0] == self.marker]

    def with_word(self, word: torch.Tensor) -> dict:
        """Token lists with the word vector (d,) in every placeholder slot, weights kept."""
        tokens = {k: [list(chunk) for chunk in v] for k, v in self.tokens.items()}
        for c, i in self.slots:
            tokens["l"][c][i] = (word,) + tuple(tokens["l"][c][i][1:])
        return tokens

    def first_chunk(self):
        """(ids (77,), slot index) of the first chunk, for the differentiable encoder used in tuning."""
        ids = torch.tensor([t[0] for t in self.tokens["l"][0]])
        first = [i for c, i in self.slots if c == 0]
        return ids, (first[0] if first else 0)


def encode_tokens(clip, cond_stage_model, tokens) -> torch.Tensor:
    """ComfyUI's own token encoding with this CLIP's options (CLIP skip), without loading anything:
    the caller makes sure the model is loaded (an additional model of the sampled MODEL)."""
    cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    return cond_stage_model.encode_token_weights(tokens)[0]


class LegacyRegistry:
    """For hosts whose model wrapper sees only tensors (ComfyUI before keyed wrappers): placeholder
    prompts are recognised by their base context, value for value. Bounded; owned by this pack."""

    def __init__(self, size=64):
        self.items = collections.deque(maxlen=size)

    def add(self, context: torch.Tensor, prompt: PlaceholderPrompt):
        self.items.append((context.detach().cpu(), prompt))

    def find(self, context: torch.Tensor):
        """The prompt whose base context this (tokens, d) row is; batched conds may repeat it to a
        common length (ComfyUI repeats contexts to the least common multiple of their lengths)."""
        row = context.detach().cpu()
        for ctx, prompt in reversed(self.items):
            n = ctx.shape[1]
            if row.shape[0] % n == 0 and row.shape[1] == ctx.shape[2] and torch.equal(ctx[0].to(row.dtype), row[:n]):
                return prompt
        return None


LEGACY = LegacyRegistry()
