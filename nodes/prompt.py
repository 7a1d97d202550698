"""Prompts with a placeholder: where its slot is, and CLIP encodings with a word vector in that slot.

The placeholder (default "*s", two tokens in the stock SD1 tokenizer) is replaced by one marker token
that does not occur elsewhere in the prompt; that slot later receives the word vector w, which
ComfyUI's own encoder splices in (emphasis, CLIP skip and long prompts keep working). A prompt keeps
the CLIP it was tokenised with, so its refined contexts keep that CLIP's skip and LoRA patches.

Per step only what w changes is encoded again (`e4t.SlotEncoder`, through the CLIP's own layers): the
positions from the first slot on of the chunks that hold one, for the batch at once, in the dtype that
is fast on the CLIP's device; chunks without a slot and the empty prompt used for emphasis are encoded
once per prompt and CLIP state. Options the engine does not reproduce fall back to ComfyUI's encoding.
"""
import collections

import torch

import comfy.model_management

from ..e4t import MARKERS, SlotEncoder, fast_dtype, input_embeddings, validate


def _ids(clip, text):
    return [t[0] for chunk in clip.tokenize(text)["l"] for t in chunk]


class PlaceholderPrompt:
    """Tokens of a prompt plus the (chunk, index) slots of its placeholder, and the CLIP that encodes it."""

    def __init__(self, clip, text: str, placeholder: str):
        placeholder = validate.placeholder(placeholder)
        self.clip, self.text, self.placeholder = clip, text, placeholder
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
        self._encoders = None                   # (CLIP state, slot_encoders()) of the last call

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

    def context(self, words: torch.Tensor, device) -> torch.Tensor:
        """(b, tokens, d), row i with words[i] (b, d), encoded by this prompt's own CLIP (its CLIP skip and
        LoRAs), equal to ComfyUI's encoding of `with_word(words[i])`: one pass for the batch."""
        encoders = self.slot_encoders()
        if encoders is None:
            return self.host_context(words, device)
        chunks, empty = encoders
        out = []
        for encoder, weights in chunks:
            z = encoder(words).float()                                                # (b or 1, 77, d)
            if weights is not None:                                                   # ComfyUI's emphasis
                z = torch.where(weights != 1, (z - empty) * weights + empty, z)
            out.append(z.expand(len(words), -1, -1))
        return torch.cat(out, dim=1).to(device)

    def host_context(self, words: torch.Tensor, device) -> torch.Tensor:
        """`context` through ComfyUI's own encoding of the whole prompt (one CLIP call for the batch)."""
        per_word = [self.with_word(w) for w in words]
        tokens = {k: [chunk for t in per_word for chunk in t[k]] for k in per_word[0]}
        out = encode_tokens(self.clip, tokens)                                        # (1, b * tokens, d)
        return out.reshape(len(per_word), -1, out.shape[-1]).to(device)

    def slot_encoders(self):
        """([(SlotEncoder, emphasis weights (77, 1) or None) per chunk], empty-prompt encoding or None), made
        once per CLIP state (device, dtype, CLIP skip, patches); None where ComfyUI's options are not ones
        the engine reproduces (then the host encodes)."""
        clip = self.clip
        model = _prepare(clip)
        layer = getattr(model, "layer", None)
        if set(self.tokens) != {"l"} or layer not in ("last", "hidden") or getattr(model, "enable_attention_masks", False) \
                or getattr(model, "zero_out_masked", False):
            return None
        tm = model.transformer.text_model
        n = len(tm.encoder.layers)
        n_layers = n if layer == "last" else model.layer_idx % n + 1
        final_norm = layer == "last" or bool(getattr(model, "layer_norm_hidden_state", True))
        device = clip.patcher.load_device
        dtype = fast_dtype(device, next(tm.parameters()).dtype)
        key = (str(device), dtype, n_layers, final_norm, getattr(clip.patcher, "patches_uuid", None))
        if self._encoders is not None and self._encoders[0] == key:
            return self._encoders[1]
        self._encoders = (key, self._make_encoders(tm, model, n_layers, final_norm, dtype, device))
        return self._encoders[1]

    def _make_encoders(self, tm, model, n_layers, final_norm, dtype, device):
        chunks, weighted = [], any(t[1] != 1.0 for chunk in self.tokens["l"] for t in chunk)
        slots = {}
        for c, i in self.slots:
            slots.setdefault(c, []).append(i)
        with torch.no_grad():
            def encoder(chunk, slots_here):
                ids, vectors = [], {}
                for position, entry in enumerate(chunk):
                    token = entry[0]
                    if isinstance(token, torch.Tensor):          # an embedding of the prompt (textual inversion)
                        if token.numel() != tm.embeddings.token_embedding.weight.shape[1]:
                            return None
                        vectors[position], token = token.flatten(), 0
                    ids.append(int(token))
                return SlotEncoder(tm, input_embeddings(tm, ids, vectors, dtype, device), slots_here, n_layers,
                                   final_norm)

            for c, chunk in enumerate(self.tokens["l"]):
                enc = encoder(chunk, slots.get(c, []))
                if enc is None:                                     # an embedding of another width
                    return None
                weights = torch.tensor([t[1] for t in chunk], dtype=torch.float32, device=device)[:, None]
                chunks.append((enc, weights if weighted else None))
            empty = None
            if weighted:
                from comfy.sd1_clip import gen_empty_tokens
                empty_ids = [(t, 1.0) for t in gen_empty_tokens(model.special_tokens, len(self.tokens["l"][0]))]
                empty = encoder(empty_ids, [])(None)[0].float()
        return chunks, empty


def encode_tokens(clip, tokens) -> torch.Tensor:
    """ComfyUI's own token encoding with this CLIP's options (CLIP skip) and patches (LoRA). Called while
    sampling: the CLIP is normally loaded already (E4T Text Encode makes it an additional model of its
    conditioning); it is loaded here only where the host does not do that (ComfyUI before keyed wrappers)."""
    _prepare(clip)
    return clip.cond_stage_model.encode_token_weights(tokens)[0]


def _prepare(clip):
    """The CLIP loaded with its patches and set to its options (CLIP skip) as `CLIP.encode_from_tokens` does;
    returns its SD1 text model wrapper (`clip_l`), or None."""
    patcher = clip.patcher
    if not any(getattr(m, "model", None) is patcher for m in comfy.model_management.current_loaded_models):
        comfy.model_management.load_models_gpu([patcher])
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    clip.cond_stage_model.set_clip_options({"execution_device": patcher.load_device})
    return getattr(clip.cond_stage_model, "clip_l", None)


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
