"""The E4T object that flows between nodes (type "E4T"): weights plus what is derived from them once."""
import copy
import logging

import torch

import comfy.model_management
import comfy.model_patcher

from ..e4t import E4TFileError, E4TWeights, ImageFeatures, backbone_state, pixels_sha256, tensors_sha256, to_uint8


def image_to_engine(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (b, h, w, 3) in [0, 1] -> the first image as (3, h, w) in [-1, 1]."""
    return image[0].movedim(-1, 0).float() * 2 - 1


def image_uint8(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE -> the first image's (h, w, 3) uint8 pixels."""
    return to_uint8(image[0])


def image_sha256(image: torch.Tensor) -> str:
    return pixels_sha256(image_uint8(image))


class E4T:
    """Loaded E4T weights. ΔW is formed once per object and the ViT runs once per concept image."""

    def __init__(self, weights: E4TWeights, name: str):
        self.weights, self.name = weights, name
        self._deltas = None
        self._features = {}
        self._vit = None
        self._backbone_sha256 = None      # of the backbone in use, once a CLIP_VISION was compared with it

    @property
    def config(self):
        return self.weights.config

    def deltas(self) -> dict:
        """ΔW per target in fp32, formed once, from an fp32 copy of the offsets (the loaded weights keep their dtype)."""
        if self._deltas is None:
            with torch.no_grad():
                self._deltas = {k: d.float() for k, d in copy.deepcopy(self.weights.offsets).float().deltas().items()}
        return self._deltas

    def vit_patcher(self):
        """The ViT backbone as a ComfyUI model, so its VRAM budgeting loads and offloads it like any other."""
        if self._vit is None:
            self._vit = comfy.model_patcher.ModelPatcher(self.weights.encoder.clip_vision,
                                                         load_device=comfy.model_management.get_torch_device(),
                                                         offload_device=comfy.model_management.unet_offload_device())
        return self._vit

    def release_vit(self) -> None:
        """Take the ViT off the GPU through ComfyUI's model management (features are cached per image)."""
        if self._vit is None:
            return
        mm = comfy.model_management
        unload = getattr(mm, "unload_model_and_clones", None) or getattr(mm, "unload_model_clones")
        unload(self._vit)

    def use_stock_backbone(self, clip_vision) -> None:
        """A core CLIP_VISION may stand in only for a file without backbone and only if proven identical; one that
        differs from the backbone already in use (the file's own, or another CLIP_VISION's) is refused, not ignored."""
        enc = self.weights.encoder
        stock = backbone_state(clip_vision.model.state_dict() if hasattr(clip_vision, "model") else clip_vision)
        digest = tensors_sha256(stock)
        if not enc.clip_vision.conv1.weight.is_meta:
            if self._backbone_sha256 is None:
                self._backbone_sha256 = tensors_sha256(backbone_state(enc.state_dict()))
            if digest != self._backbone_sha256:
                raise E4TFileError(f"{self.name} already has its ViT backbone ({self.config.backbone_id}) and the "
                                   f"connected CLIP vision model is a different one: disconnect CLIP_VISION")
            return
        if not self.config.backbone_sha256 or digest != self.config.backbone_sha256:
            raise E4TFileError(f"{self.name}: the CLIP vision model is not the backbone this E4T file was made "
                               f"with ({self.config.backbone_id}); load the matching CLIP vision file")
        enc.clip_vision.load_state_dict({k: v.float() for k, v in stock.items()}, assign=True)
        self._backbone_sha256 = digest

    def features(self, image: torch.Tensor | None, device) -> ImageFeatures:
        """ViT tokens of the concept image (cached per image); a saved concept's own tokens without one."""
        if image is None:
            if self.weights.concept_tokens is None:
                raise E4TFileError(f"{self.name} is not a personalised concept: connect the concept IMAGE")
            return ImageFeatures(tokens=self.weights.concept_tokens.float().to(device))
        key = (image_sha256(image), str(device))
        if key not in self._features:
            enc = self.weights.encoder
            if enc.clip_vision.conv1.weight.is_meta:
                raise E4TFileError(f"{self.name} carries no ViT backbone: in Apply E4T connect the CLIP_VISION it "
                                   f"was converted against (or leave IMAGE empty for a saved concept); to tune, "
                                   f"load E4T weights that include the backbone")
            comfy.model_management.load_models_gpu([self.vit_patcher()])
            with torch.no_grad():
                self._features = {key: enc.image_features(image_to_engine(image)[None].to(device))}
            if self.weights.concept_tokens is not None:
                logging.info("E4T: %s: using the new image instead of the saved concept's", self.name)
        return self._features[key]
