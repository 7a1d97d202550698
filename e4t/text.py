"""CLIP text encoding with the placeholder's input embedding replaced by a word vector.

Works on any CLIP text transformer with Hugging Face parameter names (`embeddings.token_embedding`,
`encoder.layers[i].self_attn.q_proj`, ..., `final_layer_norm`): ComfyUI's `CLIPTextModel_` and
transformers' `CLIPTextTransformer`, as used by both hosts. Residuals are added out of place so the
word vector gets gradients during tuning (ComfyUI's own layers add them in place). The modules'
own layers are called, so host casts and patches still apply. `SlotEncoder` re-encodes a prompt for
new words from the placeholder's slot on only (the sampling hosts' per-step encoding).
"""
import torch
import torch.nn.functional as F

# Rare words that are one CLIP token each: one of them holds the placeholder's slot while a prompt is
# tokenised (the published "*s" is two tokens), the first that does not occur in the prompt itself.
MARKERS = ("sks", "ohwx", "zwx", "xqx")


def _activation(mlp):
    return getattr(mlp, "activation_fn", None) or mlp.activation


def _heads(attn):
    return getattr(attn, "heads", None) or attn.num_heads


def _layer(layer, x: torch.Tensor, past=None, mask=None):
    """One transformer layer on positions x (b, m, d) -> (x, (k, v)) with x's keys and values.

    past: (k, v) (1, heads, p, d_head) of the p positions before x, kept from an earlier call, with `mask`
    (m, p + m) the causal mask of x's positions over all; None: x starts at position 0 (plain causal)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (proj(h).unflatten(-1, (_heads(attn), -1)).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if past is None:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        keys = torch.cat([past[0].expand(x.shape[0], -1, -1, -1), k], dim=2)
        values = torch.cat([past[1].expand(x.shape[0], -1, -1, -1), v], dim=2)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    x = x + attn.out_proj(a.transpose(1, 2).flatten(2))
    x = x + layer.mlp.fc2(_activation(layer.mlp)(layer.mlp.fc1(layer.layer_norm2(x))))
    return x, (k, v)


def _layers(text_model, n_layers):
    layers = text_model.encoder.layers
    return layers[: len(layers) if n_layers is None else n_layers]


def encode_with_word(text_model, tokens: torch.Tensor, word: torch.Tensor, position: torch.Tensor,
                     n_layers: int | None = None) -> torch.Tensor:
    """tokens (b, 77) ids; word (b, d) or None; position (b,) index of the placeholder -> (b, 77, d).

    n_layers: how many transformer layers to run (CLIP skip 2 = all but one); the final layer norm
    is applied to that layer's output, as both hosts do for SD1.x.
    """
    emb = text_model.embeddings
    x = emb.token_embedding(tokens)                                           # (b, n, d)
    if word is not None:
        hit = torch.arange(tokens.shape[1], device=tokens.device)[None] == position.to(tokens.device)[:, None]
        x = torch.where(hit[..., None], word[:, None].to(x), x)
    x = x + emb.position_embedding.weight[: tokens.shape[1]].to(x)
    for layer in _layers(text_model, n_layers):
        x, _ = _layer(layer, x)
    return text_model.final_layer_norm(x)


def fast_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    """The dtype to run a text encoder in: fp32 on the CPU (half-precision matmuls are slow there), the
    weights' own half precision on an accelerator."""
    if torch.device(device).type == "cpu" or weights not in (torch.float16, torch.bfloat16):
        return torch.float32
    return weights


def input_embeddings(text_model, ids, vectors: dict, dtype, device) -> torch.Tensor:
    """(1, n, d): token embeddings of `ids` (n,), rows {position: vector (d,)} put in their place (position
    embeddings not yet added)."""
    ids = torch.as_tensor(ids, device=device)[None]
    x = text_model.embeddings.token_embedding(ids).to(dtype)
    x = x.clone() if vectors else x
    for position, vector in vectors.items():
        x[0, position] = vector.to(x)
    return x


class SlotEncoder:
    """One token sequence encoded again and again with new word vectors in its placeholder slots.

    CLIP's text transformer is causal: the positions before the first slot cannot depend on the word. They
    run through the layers once (here), and each layer's keys and values for them are kept; a call runs
    only the positions from the first slot on, for a whole batch of words at once. Same layers, same
    maths as encoding the whole sequence (`encode_with_word`), so the result is equal to float rounding.
    embeds: `input_embeddings` (1, n, d) in the dtype to run in; slots: the positions that receive w;
    n_layers: layers to run (CLIP skip); final_norm: the final layer norm on that layer's output.
    """

    def __init__(self, text_model, embeds: torch.Tensor, slots, n_layers: int | None = None, final_norm=True):
        self.text_model, self.slots = text_model, sorted(slots)
        self.layers, self.final_norm = _layers(text_model, n_layers), final_norm
        self.start = self.slots[0] if self.slots else embeds.shape[1]
        n, device = embeds.shape[1], embeds.device
        positions = text_model.embeddings.position_embedding.weight[:n].to(embeds)
        x, self.past = embeds[:, : self.start] + positions[: self.start], []
        for layer in self.layers if self.start else ():
            x, kv = _layer(layer, x)
            self.past.append(kv)
        self.head = self._norm(x) if self.start else x               # (1, start, d): fixed for every word
        # per call: where the words go, what the other tail positions hold, the tail's causal mask
        offsets = torch.arange(self.start, n, device=device)
        self.hit = torch.isin(offsets, torch.tensor(self.slots, device=device, dtype=torch.long))[None, :, None]
        self.tail, self.tail_positions = embeds[:, self.start:] + positions[self.start:], positions[self.start:]
        self.mask = torch.arange(n, device=device)[None] <= offsets[:, None]

    def _norm(self, x):
        return self.text_model.final_layer_norm(x) if self.final_norm else x

    def __call__(self, words: torch.Tensor | None) -> torch.Tensor:
        """words (b, d) -> (b, n, d) in the embeddings' dtype; without slots the fixed encoding (1, n, d)."""
        if not self.slots:
            return self.head
        x = torch.where(self.hit, words[:, None].to(self.tail) + self.tail_positions, self.tail)
        for layer, past in zip(self.layers, self.past or [None] * len(self.layers)):
            x, _ = _layer(layer, x, past, self.mask)
        return torch.cat([self.head.expand(x.shape[0], -1, -1), self._norm(x)], dim=1)


def domain_embedding(text_model, token_id: int) -> torch.Tensor:
    """e_domain: the input token embedding of the domain word (one CLIP token, e.g. 'face')."""
    return text_model.embeddings.token_embedding.weight[token_id].detach().float().clone()


class WordInjector(torch.nn.Module):
    """`encode_with_word` as a module, so a host can run it with substituted (trainable or cloned)
    text-encoder weights through `torch.func.functional_call`."""

    def __init__(self, text_model, n_layers: int | None = None):
        super().__init__()
        self.text_model, self.n_layers = text_model, n_layers

    def forward(self, tokens, word, position):
        return encode_with_word(self.text_model, tokens, word, position, self.n_layers)

    def on_copies(self, device=None):
        """(tokens, word, position) -> context, run on clones of the weights: differentiable in `word` even
        where the host's weights are inference tensors (which autograd cannot save); the host's stay untouched."""
        with torch.inference_mode(False):
            weights = {k: v.detach().to(device).clone() for k, v in self.named_parameters()}
        return lambda tokens, word, position: torch.func.functional_call(self, weights, (tokens, word, position))
