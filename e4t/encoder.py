"""The E4T encoder: concept-image tokens + pooled U-Net features -> a word-embedding offset.

Layout and semantics are those of the published face weights (mkshing/e4t-diffusion, v1):
an open_clip ViT visual tower without projection (`clip_vision.*`), whose 129 tokens are the
layer-normed final CLS plus the *raw* final-layer patch tokens at odd indices (open_clip <= 2.22
behaviour, reproduced here by hand so any open_clip release gives the same numbers), and heads
`unet_feature_embedder`, `feature_linear`, `first_linears[i]`, `final_linear`.
"""
import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def unet_feature_channels(model_channels, channel_mult, num_res_blocks):
    """Channels of the maps the feature pass pools: every `input_blocks` output, then the middle block."""
    channels = [model_channels]
    for level, mult in enumerate(channel_mult):
        channels += [model_channels * mult] * num_res_blocks
        if level < len(channel_mult) - 1:
            channels.append(model_channels * mult)
    return tuple(channels + [model_channels * channel_mult[-1]])


@dataclass(frozen=True)
class EncoderConfig:
    """Every size of the encoder; the defaults are the published ViT-H/14 + SD1.x model."""
    vit_width: int = 1280
    vit_layers: int = 32
    vit_heads: int = 16
    vit_patch: int = 14
    vit_mlp_ratio: float = 4.0
    image_size: int = 224
    unet_dim: int = sum(unet_feature_channels(320, (1, 2, 4, 4), 2))   # 10880 for SD1.x
    word_dim: int = 768

    @property
    def n_tokens(self):  # final CLS + every second patch token
        return (self.image_size // self.vit_patch) ** 2 // 2 + 1


def build_backbone(cfg: EncoderConfig) -> nn.Module:
    """An open_clip VisionTransformer of the configured size, random weights, projection removed."""
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.vit_patch, width=cfg.vit_width,
                            layers=cfg.vit_layers, heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio,
                            output_dim=cfg.vit_width)
    vit.proj = None
    return vit


def preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """(b, 3, h, w) in [-1, 1] -> CLIP input, as the published code: bicubic, align_corners, no antialias."""
    x = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=True, antialias=False)
    x = (x + 1) / 2
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_tokens(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(b, 3, s, s) preprocessed -> (b, n_tokens, width): ln_post(final CLS), then raw patch tokens 1, 3, 5, ..."""
    x = rearrange(vit.conv1(pixels), "b d h w -> b (h w) d")
    cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)
    x = vit.ln_pre(x)
    if getattr(vit.transformer, "batch_first", False):
        x = vit.transformer(x)
    else:  # open_clip < 2.24 runs its stack sequence-first
        x = vit.transformer(x.transpose(0, 1)).transpose(0, 1)
    pooled = vit.ln_post(x[:, 0])
    return torch.cat([pooled[:, None], x[:, 1:][:, 1::2]], dim=1)


def _autocast_off(device):
    """Autocast disabled where torch has it for `device` (the heads run in their own dtype)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()


@dataclass
class ImageFeatures:
    """The CLIP tokens of one concept image (b, n, width): the ViT runs once per image."""
    tokens: torch.Tensor


class Encoder(nn.Module):
    """E(image, U-Net maps) -> (b, word_dim). Attribute names are the published state-dict names."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig(), device=None):
        super().__init__()
        d = cfg.vit_width
        self.cfg = cfg
        with torch.device(device) if device is not None else nullcontext():
            self.clip_vision = build_backbone(cfg)
        self.unet_feature_embedder = nn.Sequential(nn.Linear(cfg.unet_dim, d, device=device), nn.LeakyReLU(),
                                                   nn.Linear(d, d, device=device))
        self.feature_linear = nn.Linear(2 * d, d, device=device)
        self.first_linears = nn.ModuleList(nn.Linear(d, d, device=device) for _ in range(cfg.n_tokens))
        self.final_linear = nn.Linear(d, cfg.word_dim, device=device)

    def heads(self):
        """The trainable heads (everything but the ViT backbone)."""
        return [p for n, p in self.named_parameters() if not n.startswith("clip_vision.")]

    def image_features(self, image: torch.Tensor) -> ImageFeatures:
        """Run the ViT once for a concept image (b, 3, h, w) in [-1, 1]."""
        param = self.clip_vision.conv1.weight
        if param.is_meta:
            raise RuntimeError("this E4T file carries no ViT backbone, only the cached tokens of its concept "
                               "image: apply it without a new image, or load the full E4T weights")
        pixels = preprocess(image.to(param.device, torch.float32), self.cfg.image_size).to(param.dtype)
        return ImageFeatures(tokens=clip_tokens(self.clip_vision, pixels))

    def embed_unet(self, unet_maps) -> torch.Tensor:
        """Spatial mean of each map, concatenated in order, then the U-Net embedder: (b, d)."""
        pooled = torch.cat([m.float().mean(dim=(2, 3)) for m in unet_maps], dim=-1)
        return self.unet_feature_embedder(pooled.to(self.final_linear.weight.dtype))

    def forward(self, features: ImageFeatures, unet_maps) -> torch.Tensor:
        """The published forward: z_i = F_i(L [h_i; u]); e = final(leaky(mean_i z_i)), in the heads' own dtype
        (autocast off). L [h_i; u] is computed as L_h h_i + L_u u, the image half once per image batch. Each F_i reads
        its parameter itself: no weight-sized copy of the 129 F_i (0.4-0.8 GB for ViT-H) is made or kept for
        backward; stacked (`StackedLinears`, the fast tune's layout) they run as one batched product."""
        d = self.cfg.vit_width
        with _autocast_off(self.final_linear.weight.device):
            u = self.embed_unet(unet_maps)                                                # (b, d)
            u_term = u @ self.feature_linear.weight[:, d:].T + self.feature_linear.bias   # (b, d)
            h = features.tokens.to(u.dtype) @ self.feature_linear.weight[:, :d].T         # (b|1, n, d)
            x = h + u_term[:, None]                                                       # (b, n, d): L [h_i; u]
            if isinstance(self.first_linears, StackedLinears):
                z = self.first_linears(x)
            else:
                z = sum(lin(x[:, i]) for i, lin in enumerate(self.first_linears)) / len(self.first_linears)
            return self.final_linear(F.leaky_relu(z, 0.01))

    def stack_first_linears(self, device=None, dtype=torch.float32) -> "Encoder":
        """`first_linears` replaced by a `StackedLinears` copy on `device` in `dtype` (in place; returns self)."""
        self.first_linears = StackedLinears(self.first_linears, device, dtype)
        return self

    def unstack_first_linears(self) -> "Encoder":
        """Back to the published layout, one `nn.Linear` per token (in place; returns self)."""
        if isinstance(self.first_linears, StackedLinears):
            self.first_linears = self.first_linears.unstacked()
        return self

    @torch.no_grad()
    def fold(self, features: ImageFeatures) -> "FoldedEncoder":
        """The encoder for sampling, with frozen heads and one concept image (see FoldedEncoder)."""
        return FoldedEncoder(self, features)


class StackedLinears(nn.Module):
    """The n `first_linears` as the fast tune trains them: weights one (n, d, d) tensor, biases one (n, d), so their
    part of the forward is a few kernels and of the backward a few, not a few per linear (129 for ViT-H/14). No copy
    is made (the batched product reads the parameter through a transposed view), but backward forms the weights'
    gradient whole: the lean tune, which steps each gradient as it comes, keeps the published layout."""

    def __init__(self, linears: nn.ModuleList, device=None, dtype=torch.float32):
        super().__init__()
        with torch.no_grad():
            weight, bias = torch.stack([lin.weight for lin in linears]), torch.stack([lin.bias for lin in linears])
        self.weight, self.bias = nn.Parameter(weight.to(device, dtype)), nn.Parameter(bias.to(device, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """mean_i (F_i x_i + b_i): x (b, n, d) -> (b, d)."""
        return torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2)).mean(0) + self.bias.mean(0)

    def unstacked(self) -> nn.ModuleList:
        """Detached copies in the published layout."""
        n, out_dim, in_dim = self.weight.shape
        linears = nn.ModuleList(nn.Linear(in_dim, out_dim, device="meta") for _ in range(n))
        for lin, w, b in zip(linears, self.weight.detach(), self.bias.detach()):
            lin.weight, lin.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        return linears


class FoldedEncoder(nn.Module):
    """E(image, ·) for a fixed image and frozen heads, exact up to float rounding.

    feature_linear -> first_linears[i] -> mean is linear, so it splits into an image term computed
    once (the ViT tokens through all 129 linears) and one matrix mean_i F_i applied to the U-Net half.
    Per step this costs the U-Net embedder and three small matmuls; the 211 M-parameter stack of
    first_linears is no longer needed, so this module is what hosts keep on the GPU while sampling.
    """

    def __init__(self, encoder: Encoder, features: ImageFeatures):
        super().__init__()
        d = encoder.cfg.vit_width
        weight = torch.stack([lin.weight for lin in encoder.first_linears]).float()          # (n, d, d)
        bias = torch.stack([lin.bias for lin in encoder.first_linears]).float()
        lin = encoder.feature_linear
        h = features.tokens.float() @ lin.weight[:, :d].float().T                           # (b, n, d)
        mean_first = weight.mean(0)                                                          # (d, d)
        self.register_buffer("image_term", torch.einsum("bni,noi->bo", h, weight) / weight.shape[0]
                             + bias.mean(0) + lin.bias.float() @ mean_first.T)               # (b, d)
        self.register_buffer("u_matrix", mean_first @ lin.weight[:, d:].float())             # (d, d)
        # fp32 copies: the folded head is moved and cast by hosts without touching the encoder it came from
        self.unet_feature_embedder = copy.deepcopy(encoder.unet_feature_embedder).float()
        self.final_linear = copy.deepcopy(encoder.final_linear).float()

    def forward(self, unet_maps) -> torch.Tensor:
        pooled = torch.cat([m.float().mean(dim=(2, 3)) for m in unet_maps], dim=-1)
        dtype = self.final_linear.weight.dtype
        u = self.unet_feature_embedder(pooled.to(dtype))                                     # (b, d)
        z = self.image_term.to(dtype) + u @ self.u_matrix.to(dtype).T
        return self.final_linear(F.leaky_relu(z, 0.01))
