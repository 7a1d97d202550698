"""CLIP text encoding with the placeholder's input embedding replaced by a word vector.

Works on any CLIP text transformer with Hugging Face parameter names (`embeddings.token_embedding`,
`encoder.layers[i].self_attn.q_proj`, ..., `final_layer_norm`): ComfyUI's `CLIPTextModel_` and
transformers' `CLIPTextTransformer`, as used by both hosts. Residuals are added out of place so the
word vector gets gradients during tuning (ComfyUI's own layers add them in place). The modules'
own layers are called, so host casts and patches still apply.
"""
import torch
import torch.nn.functional as F

# Rare words that are one CLIP token each: one of them holds the placeholder's slot while a prompt is
# tokenised (the published "*s" is two tokens), the first that does not occur in the prompt itself.
MARKERS = ("sks", "ohwx", "zwx", "xqx")


def _activation(mlp):
    return getattr(mlp, "activation_fn", None) or mlp.activation


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
    layers = text_model.encoder.layers
    for layer in layers[: len(layers) if n_layers is None else n_layers]:
        attn = layer.self_attn
        heads = getattr(attn, "heads", None) or attn.num_heads
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).unflatten(-1, (heads, -1)).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + attn.out_proj(a)
        x = x + layer.mlp.fc2(_activation(layer.mlp)(layer.mlp.fc1(layer.layer_norm2(x))))
    return text_model.final_layer_norm(x)


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
