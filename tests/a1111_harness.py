"""Runs the E4T extension inside a real A1111 1.10 checkout, headless on CPU, with tiny random models.

Started by tests/test_a1111.py with the webui's own Python (its venv, its torch):

    python tests/a1111_harness.py --webui A1111_PATH --data DATA_DIR --mode normal|medvram|lowvram [--only CASE ...]

Everything it needs is made at run time from the repository and the webui's own packages: DATA_DIR is a
fresh webui data folder (--data-dir, so the checkout is never written to) with the extension linked into
DATA_DIR/extensions/e4t; a tiny SD1 checkpoint (the webui's own ldm classes, context width 64) whose CLIP
tokenizer files are written from the BPE merges inside the open_clip_torch wheel (no Hugging Face cache,
no network), tiny E4T weights and a tiny concept. Each case sets up what it needs, so cases run in any
order or alone (--only, in the order given). Each case prints one line
`E4T-RESULT {"case": ..., "ok": ..., ...}`.
"""
import argparse
import json
import os
import sys
import time
import traceback
from contextlib import closing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT_NAME = "e4t"
CASES = {}
RESULTS = []


def case(*modes):
    def register(fn):
        CASES[fn.__name__] = (fn, modes or ("normal",))
        return fn
    return register


def check(cond, message):
    if not cond:
        raise AssertionError(message)


# --- tiny models ----------------------------------------------------------------------------------

TINY_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
        num_heads: 4
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 64
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2, 4, 4], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params: {version: "%s"}
"""


def _bytes_to_unicode():
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder):
    """OpenAI CLIP's tokenizer files (vocab.json, merges.txt, configs) built from the BPE merges shipped in
    the open_clip_torch wheel, the same 49 408 tokens: what transformers' CLIPTokenizer reads offline."""
    import gzip
    import open_clip
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = _bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    check(len(vocab) == 49408, f"open_clip's BPE gave {len(vocab)} tokens, not CLIP's 49408")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({**special, "model_max_length": 77, "do_lower_case": True, "add_prefix_space": False,
                   "errors": "replace", "tokenizer_class": "CLIPTokenizer"}, f)


def build_tiny_checkpoint(data, seed=0):
    """A tiny random SD1 checkpoint from the webui's own ldm classes, with its tiny CLIP in a folder."""
    import safetensors.torch
    import torch
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel
    from ldm.util import instantiate_from_config
    clip_dir = os.path.join(data, "tiny", "tiny-clip")
    write_clip_tokenizer(clip_dir)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    clip = CLIPTextModel(cfg)
    with torch.no_grad():        # LayerNorm biases of 0 make every token zero-mean: the webui's emphasis
        for name, p in clip.named_parameters():     # renormalisation (mean / mean) would divide 0 by 0
            if "layer_norm" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
    clip.save_pretrained(clip_dir)
    ckpt = os.path.join(data, "tiny", "tiny-sd1.safetensors")
    with open(ckpt[:-len(".safetensors")] + ".yaml", "w") as f:
        f.write(TINY_YAML % clip_dir)
    m = instantiate_from_config(OmegaConf.load(ckpt[:-len(".safetensors")] + ".yaml").model)
    with torch.no_grad():        # zero_module()'d convs would make the U-Net output identically 0
        for p in m.parameters():
            if p.abs().max() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, ckpt)
    return ckpt


def tiny_encoder_config(unet):
    import e4t
    from e4t.encoder import unet_feature_channels
    channels = unet_feature_channels(unet.model_channels, unet.channel_mult, unet.num_res_blocks[0])
    return e4t.EncoderConfig(vit_width=80, vit_layers=2, vit_heads=1, vit_patch=8, image_size=32,
                             unet_dim=sum(channels), word_dim=64)


def write_tiny_e4t(folder, unet, seed=3):
    """Tiny E4T weights (with ViT) and a tiny concept (tuned delta on every U-Net weight)."""
    import torch
    import e4t
    from dataclasses import asdict
    torch.manual_seed(seed)
    cfg = tiny_encoder_config(unet)
    encoder = e4t.Encoder(cfg).eval()
    offsets = e4t.Offsets(e4t.targets(unet.state_dict()), identity=False)
    with torch.no_grad():
        for p in offsets.parameters():
            p.mul_(0.3)
    config = e4t.DomainConfig(domain_word="face", encoder=asdict(cfg))
    os.makedirs(folder, exist_ok=True)
    e4t.save(e4t.E4TWeights(config=config, encoder=encoder, offsets=offsets), os.path.join(folder, "tiny-e4t.safetensors"))
    with torch.no_grad():
        tokens = encoder.image_features(torch.rand(1, 3, 48, 40) * 2 - 1).tokens
    delta = {n: torch.randn_like(p) * 0.01 for n, p in unet.named_parameters()}
    concept = e4t.E4TWeights(config=e4t.DomainConfig(domain_word="face", encoder=asdict(cfg),
                                                     concept={"image_sha256": "test"}),
                             encoder=encoder, offsets=offsets, unet_delta=delta, concept_tokens=tokens,
                             concept_image=torch.zeros(8, 8, 3, dtype=torch.uint8))
    e4t.save(concept, os.path.join(folder, "tiny-concept.safetensors"), include_backbone=False)


def write_tiny_lora(folder, unet, rank=2, seed=5):
    """A LoRA on one attn2.to_k (down_blocks.0.attentions.0 = input_blocks.1.1); returns (module, ΔW)."""
    import safetensors.torch
    import torch
    module = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, module.in_features, generator=g) * 0.5
    up = torch.randn(module.out_features, rank, generator=g) * 0.5
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                 f"{key}.alpha": torch.tensor(float(rank))}, os.path.join(folder, "e4ttest.safetensors"))
    return module, up @ down


# --- webui ------------------------------------------------------------------------------------------

class Env:
    pass


ENV = Env()


def start_webui(webui, data, mode):
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"   # nothing is downloaded
    os.environ["HF_HOME"] = os.path.join(data, "hf")       # and no user's cache is read: empty
    ext = os.path.join(data, "extensions", EXT_NAME)
    os.makedirs(os.path.dirname(ext), exist_ok=True)
    if not os.path.lexists(ext):
        os.symlink(REPO, ext)
    os.chdir(webui)
    sys.path.insert(0, webui)
    ckpt = os.path.join(data, "tiny", "tiny-sd1.safetensors")
    sys.argv = ["webui.py", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full",
                "--ckpt", ckpt, "--do-not-download-clip", "--disable-opt-split-attention", "--skip-version-check",
                "--no-download-sd-model", "--skip-load-model-at-start", "--data-dir", data]
    if mode in ("medvram", "lowvram"):
        sys.argv.append("--" + mode)
    from modules import initialize
    initialize.imports()
    if not os.path.exists(ckpt):
        build_tiny_checkpoint(data)
    initialize.initialize()
    from modules import script_callbacks, shared
    script_callbacks.before_ui_callback()
    import torch
    torch.manual_seed(0)
    ENV.sd_model = shared.sd_model
    ENV.unet = ENV.sd_model.model.diffusion_model
    ENV.data = data
    ENV.e4t_dir = shared.cmd_opts.e4t_dir
    if not os.path.exists(os.path.join(ENV.e4t_dir, "tiny-concept.safetensors")):
        write_tiny_e4t(ENV.e4t_dir, ENV.unet)
    ENV.lora_module, ENV.lora_delta = write_tiny_lora(shared.cmd_opts.lora_dir, ENV.unet)
    ENV.snapshot = snapshot()
    ENV.probe = Probe()
    script_callbacks.on_cfg_denoiser(ENV.probe.on_cfg_denoiser, name="e4t-test-probe")


def snapshot():
    return {k: v.detach().clone() for k, v in ENV.sd_model.state_dict().items()}


def changed_tensors(reference):
    import torch
    now = ENV.sd_model.state_dict()
    return [k for k in reference if not torch.equal(reference[k], now[k])]


def e4t_setting(name, value):
    """Set one of E4T's webui settings (registering the section as the settings page would); returns the old value."""
    from modules import shared
    from e4t_a1111 import host, ui
    if name not in shared.opts.data_labels:
        ui.settings()
    old = host.opt(name, None)
    setattr(shared.opts, name, value)
    return old


def hook_count():
    """Hooks and instance-level forwards (E4T's weights are the latter) on the model's modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m))
               for m in ENV.sd_model.modules())


def e4t_modules():
    from e4t_a1111 import host, sampling, store, tuning, ui
    return host, sampling, store, tuning, ui


def our_script():
    from modules import scripts
    data = [d for d in scripts.scripts_data if d.path.endswith(os.path.join("scripts", "e4t_a1111.py"))]
    check(len(data) == 1, f"E4T script loaded {len(data)} times: {[d.path for d in scripts.scripts_data]}")
    return data[0]


class Probe:
    """Records what the U-Net and the denoiser callbacks see (registered after E4T's callback)."""

    def __init__(self):
        self.active, self.events, self.cond_rows = False, [], []

    def reset(self):
        self.events, self.cond_rows, self.active = [], [], True

    def on_cfg_denoiser(self, params):
        if not self.active:
            return
        from modules import prompt_parser
        from e4t_a1111 import sampling
        den = params.denoiser
        c, uc = den.p.get_conds()
        _, static = prompt_parser.reconstruct_multicond_batch(c, den.step)
        static_uncond = prompt_parser.reconstruct_cond_batch(uc, den.step)
        session = sampling.RUNTIME.session
        self.cond_rows.append(dict(
            step=den.step, denoiser=type(den).__name__, cond=params.text_cond.clone(), static=static.clone(),
            uncond=params.text_uncond.clone(), static_uncond=static_uncond.clone(), x=params.x.clone(),
            vec=None if getattr(getattr(session, "refinement", None), "last", None) is None
            else session.refinement.last.clone(),
            held=None if session is None else session.placeholder.embedding.vec.clone(),
            e_domain=None if session is None else session.e_domain.clone(),
            hr=bool(getattr(den.p, "is_hr_pass", False)), job=id(den.p), hooks=hook_count()))

    def unet_inputs(self):
        """Pre-hooks on input_blocks[0] and time_embed[0]: (x, timestep embedding) of every call."""
        seen = {"x": [], "temb": [], "gpu": []}
        from modules import lowvram

        def block0(module, args):
            seen["x"].append(args[0].detach().clone())
            seen["gpu"].append(lowvram.module_in_gpu)

        def temb(module, args):
            seen["temb"].append(args[0].detach().clone())
        handles = [ENV.unet.input_blocks[0].register_forward_pre_hook(block0),
                   ENV.unet.time_embed[0].register_forward_pre_hook(temb)]
        return seen, handles


class ProbeScript:
    """An always-on script after E4T's: runs `on_process` / `on_sampling` hooks given by a case."""

    def __init__(self, on_process=None, on_sampling=None, on_post=None):
        from modules import scripts

        class _Probe(scripts.Script):
            def title(self):
                return "E4T test probe"

            def show(self, is_img2img):
                return scripts.AlwaysVisible

            def process(self, p, *args):
                if on_process:
                    on_process(p)

            def process_before_every_sampling(self, p, *args, **kwargs):
                if on_sampling:
                    on_sampling(p)

            def postprocess(self, p, processed, *args):
                if on_post:
                    on_post(p)

        self.script = _Probe()
        self.script.filename = os.path.abspath(__file__)


def runner(e4t_args, probes=(), img2img=False):
    from modules import scripts
    r = scripts.ScriptRunner()
    ours = our_script().script_class()
    ours.filename = our_script().path
    items = [(ours, len(e4t_args))] + [(pr.script, 0) for pr in probes]
    start = 0
    for script, n in items:
        script.is_txt2img, script.is_img2img = not img2img, img2img
        script.args_from, script.args_to, script.alwayson = start, start + n, True
        start += n
        r.scripts.append(script)
        r.alwayson_scripts.append(script)
    return r


def generate(prompt, e4t_args=(False, None, 1.0, 0), sampler="Euler", steps=3, negative="", probes=(),
             img2img=False, batch=1, **kw):
    import numpy as np
    from PIL import Image
    from modules import processing
    common = dict(sd_model=ENV.sd_model, prompt=prompt, negative_prompt=negative, sampler_name=sampler, steps=steps,
                  cfg_scale=7.0, width=64, height=64, seed=1234, batch_size=batch, n_iter=1, do_not_save_samples=True,
                  do_not_save_grid=True, outpath_samples=os.path.join(ENV.data, "outputs"),
                  outpath_grids=os.path.join(ENV.data, "outputs"))
    if img2img:
        rng = np.random.default_rng(0)
        init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        p = processing.StableDiffusionProcessingImg2Img(init_images=[init], denoising_strength=0.6, **common, **kw)
    else:
        p = processing.StableDiffusionProcessingTxt2Img(**common, **kw)
    p.script_args = list(e4t_args)
    p.scripts = runner(e4t_args, probes, img2img)
    with closing(p):                        # as txt2img/img2img/the API run a job: p.close() even on errors
        res = processing.process_images(p)
    return p, res


def concept_args(name="tiny-concept", strength=1.0, t_stop=0, plot=False):
    return (True, name, strength, t_stop, plot)


# --- cases ------------------------------------------------------------------------------------------

@case("normal", "medvram", "lowvram")
def test_extension_is_discovered():
    from modules import extensions, script_callbacks, scripts, shared
    names = [e.name for e in extensions.active()]
    check(EXT_NAME in names, f"extension {EXT_NAME!r} not active: {names}")
    our_script()
    check(shared.cmd_opts.e4t_dir == os.path.join(ENV.data, "models", "e4t"),
          f"--e4t-dir default is {shared.cmd_opts.e4t_dir!r}")
    for category in ("callbacks_cfg_denoiser", "callbacks_ui_tabs", "callbacks_ui_settings", "callbacks_infotext_pasted"):
        found = [c.name for c in script_callbacks.callback_map[category] if "e4t_a1111.py" in c.name]
        check(found, f"no E4T callback in {category}")
    r = scripts.ScriptRunner()
    r.initialize_scripts(is_img2img=False)
    check("E4T" in [s.title() for s in r.alwayson_scripts], "E4T is not an always-on txt2img script")
    _, _, store, _, _ = e4t_modules()
    concepts, weights = store.names(store.CONCEPT), store.names(store.WEIGHTS)   # (other cases add tuned ones)
    check("tiny-concept" in concepts and "tiny-e4t" not in concepts, f"concepts listed: {concepts}")
    check("tiny-e4t" in weights and "tiny-concept" not in weights, f"weights listed: {weights}")
    return {"extensions": names}


def _swap_checks(rows, seen, n_images, placeholder_rows):
    """Shared assertions of the per-step conditioning swap; returns a summary."""
    import torch
    check(len(rows) >= 2, f"only {len(rows)} denoiser calls recorded")
    # the U-Net saw, per denoiser call: the feature pass (n rows), then the real call (cond + uncond rows)
    check(len(seen["x"]) == 2 * len(rows), f"{len(seen['x'])} U-Net block-0 calls for {len(rows)} denoiser calls "
                                           f"(expected one feature pass + one real call each)")
    for i, row in enumerate(rows):
        fx, rx = seen["x"][2 * i], seen["x"][2 * i + 1]
        ft, rt = seen["temb"][2 * i], seen["temb"][2 * i + 1]
        check(fx.shape[0] == n_images and rx.shape[0] == row["x"].shape[0],
              f"call {i}: feature pass rows {fx.shape[0]}, real rows {rx.shape[0]}")
        err_x = (fx - rx[-n_images:]).abs().max().item()
        err_t = (ft - rt[-n_images:]).abs().max().item()
        check(err_x <= 1e-6, f"call {i} ({row['denoiser']}): feature-pass U-Net input differs from the sampler's by {err_x}")
        check(err_t <= 1e-5, f"call {i} ({row['denoiser']}): feature-pass timestep embedding differs by {err_t}")
        check(torch.equal(row["uncond"], row["static_uncond"]), f"call {i}: the negative conditioning was changed")
        for r in range(row["cond"].shape[0]):
            same = torch.equal(row["cond"][r], row["static"][r])
            if r in placeholder_rows:
                check(not same, f"call {i}: row {r} (placeholder) was not re-encoded")
            else:
                check(same, f"call {i}: row {r} (no placeholder) changed")
    vecs = [r["vec"] for r in rows]
    for a, b in zip(vecs, vecs[1:]):
        check(not torch.equal(a, b), "the predicted embedding did not change between steps")
    for row in rows:     # after each re-encode the placeholder holds e_domain again (hires, negative, cache misses)
        check(torch.equal(row["held"].flatten().float(), row["e_domain"].flatten().float()),
              "the predicted embedding stayed in the placeholder after the re-encode")
    return {"calls": len(rows), "denoiser": rows[0]["denoiser"], "steps": [r["step"] for r in rows]}


def _run_swap(sampler, steps, batch=1, **kw):
    from e4t_a1111 import sampling
    prompts = ["a photo of *s AND a red car", "*s in the snow"][:batch]
    ENV.probe.reset()
    seen, handles = ENV.probe.unet_inputs()
    predictions = []

    def count(p):
        predictions.append(sampling.RUNTIME.session)
    try:
        _, res = generate(prompts if batch > 1 else prompts[0], concept_args(), sampler=sampler, steps=steps,
                          negative="blurry, *s", batch=batch, probes=[ProbeScript(on_sampling=count)], **kw)
    finally:
        ENV.probe.active = False
        for h in handles:
            h.remove()
    session = predictions[0]
    rows = ENV.probe.cond_rows
    check(session is not None and session.calls == len(rows),
          f"refinement ran {getattr(session, 'calls', None)} times for {len(rows)} denoiser calls")
    check(len(session.refinement.history) == len(rows), "one prediction per denoiser call expected (t_stop 0)")
    placeholder_rows = {0} if batch == 1 else {0, 2}
    summary = _swap_checks(rows, seen, batch, placeholder_rows)
    check(sampling.RUNTIME.session is None and hook_count() == ENV.hooks_before, "E4T left hooks or a session")
    info = res.info
    check("E4T: tiny-concept" in info and "E4T strength: 1.0" in info and "E4T t_stop: 0" in info,
          f"infotext lacks E4T fields: {info}")
    return summary


@case()
def test_conditioning_swapped_every_step_euler():
    ENV.hooks_before = hook_count()
    return _run_swap("Euler", 3, batch=2)


@case()
def test_conditioning_swapped_every_step_ddim():
    ENV.hooks_before = hook_count()
    return _run_swap("DDIM", 4)


@case()
def test_hires_fix_second_pass_is_refined():
    ENV.hooks_before = hook_count()
    ENV.probe.reset()
    seen, handles = ENV.probe.unet_inputs()
    try:
        generate("a photo of *s", concept_args(), sampler="Euler", steps=3, enable_hr=True, hr_scale=2,
                 hr_upscaler="Latent", hr_second_pass_steps=6, denoising_strength=0.6,
                 hr_prompt="a portrait of *s AND a hat", hr_sampler_name="DDIM")
    finally:
        ENV.probe.active = False
        for h in handles:
            h.remove()
    rows = ENV.probe.cond_rows
    first, second = [r for r in rows if not r["hr"]], [r for r in rows if r["hr"]]
    check(first and second, f"passes seen: first {len(first)}, hires {len(second)}")
    check(second[0]["cond"].shape[0] == 2 and second[0]["x"].shape[-1] == 16,
          f"hires pass: cond rows {second[0]['cond'].shape[0]}, latent {tuple(second[0]['x'].shape)}")
    n_first = len(first)
    _swap_checks(first, {k: v[: 2 * n_first] for k, v in seen.items()}, 1, {0})
    _swap_checks(second, {k: v[2 * n_first:] for k, v in seen.items()}, 1, {0})
    return {"first": len(first), "hires": len(second), "hires_denoiser": second[0]["denoiser"]}


@case()
def test_img2img_is_refined():
    ENV.hooks_before = hook_count()
    ENV.probe.reset()
    seen, handles = ENV.probe.unet_inputs()
    try:
        generate("a photo of *s", concept_args(), sampler="Euler", steps=5, img2img=True)
    finally:
        ENV.probe.active = False
        for h in handles:
            h.remove()
    return {"calls": _swap_checks(ENV.probe.cond_rows, seen, 1, {0})["calls"]}


@case()
def test_norm_plot_only_when_ticked():
    """'Plot the embedding': one image per sampler run appended after the samples (with an infotext each),
    one point per denoiser call = (t, ‖w − e_domain‖ mean over the batch); nothing when unticked."""
    import numpy as np
    from e4t_a1111 import host, sampling, ui
    e_domain = host.input_embedding(ENV.sd_model, host.single_token(ENV.sd_model, "face"))
    returned, captured = [], []

    class Recorder:                     # what the refinement hands to the prompt, call by call
        def __init__(self, inner):
            self.inner = inner

        def reset(self):
            self.inner.reset()

        def __call__(self, unet, x, t, dtype=None, maps=None):
            w = self.inner(unet, x, t, dtype, maps=maps)
            returned.append((float(t.flatten()[0]), w.detach().float().clone()))
            return w

    def record(p):
        s = sampling.RUNTIME.session
        if not isinstance(s.refinement, Recorder):
            s.refinement = Recorder(s.refinement)

    original = ui.add_norm_plots

    def spy(processed, runs):
        captured.append([(run.hires, run.points()) for run in runs])
        original(processed, runs)

    prompts = ["a photo of *s", "*s in the snow"]
    hooks_before = hook_count()
    ui.add_norm_plots = spy
    try:
        _, plain = generate(prompts, concept_args(), steps=3, batch=2)
        check(len(plain.images) == 2 and len(plain.infotexts) == 2 and not captured,
              f"unticked: {len(plain.images)} images, {len(plain.infotexts)} infotexts, plots {len(captured)}")
        ENV.probe.reset()
        _, res = generate(prompts, concept_args(plot=True), steps=3, batch=2, probes=[ProbeScript(on_sampling=record)])
        ENV.probe.active = False
        calls = len(ENV.probe.cond_rows)
    finally:
        ENV.probe.active = False
        ui.add_norm_plots = original
    check(len(res.images) == 3 and len(res.infotexts) == 3, f"ticked: {len(res.images)} images, "
                                                              f"{len(res.infotexts)} infotexts (2 samples + 1 plot)")
    check(res.infotexts[2] == res.info and "E4T: tiny-concept" in res.info, "the plot's infotext is not the job's")
    for a, b in zip(plain.images, res.images[:2]):
        check(np.array_equal(np.asarray(a), np.asarray(b)), "ticking the plot changed the samples")
    plot = res.images[2]
    check(plot.size == (512, 320) and np.asarray(plot).min() < 128, f"plot image {plot.size} looks empty")
    check(len(captured) == 1 and len(captured[0]) == 1, f"plotted runs: {captured}")
    points = captured[0][0][1]
    check(len(points) == calls == len(returned) == 3, f"{len(points)} points for {calls} denoiser calls")
    for (t, norm), (t_w, w) in zip(points, returned):
        want = (w - e_domain.to(w)).norm(dim=-1).mean().item()
        check(abs(t - t_w) < 1e-6 and abs(norm - want) <= 1e-5 * max(1.0, want),
              f"recorded ({t}, {norm}), expected ({t_w}, {want})")
    check(all(a[0] > b[0] for a, b in zip(points, points[1:])), f"timesteps not decreasing: {points}")
    # hires fix: one plot per sampler run
    ENV.probe.reset()
    ui.add_norm_plots = spy
    try:
        _, hr = generate("a photo of *s", concept_args(plot=True), steps=3, enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent", hr_second_pass_steps=4, denoising_strength=0.6)
        rows = ENV.probe.cond_rows
    finally:
        ENV.probe.active = False
        ui.add_norm_plots = original
    runs = captured[-1]
    first, second = sum(not r["hr"] for r in rows), sum(r["hr"] for r in rows)
    check(len(hr.images) == 3 and len(hr.infotexts) == 3, f"hires: {len(hr.images)} images (1 sample + 2 plots)")
    check([h for h, _ in runs] == [False, True] and [len(pts) for _, pts in runs] == [first, second],
          f"hires runs {[(h, len(pts)) for h, pts in runs]} for {first} + {second} denoiser calls")
    check(sampling.RUNTIME.session is None and hook_count() == hooks_before, "E4T left hooks or a session")
    return {"points": points, "hires_points": [len(pts) for _, pts in runs]}


@case()
def test_reencoding_matches_webui_prompt_path():
    """With w held at the webui's own placeholder vector, the re-encoded conditioning must equal the
    webui's (`_matches_static`): AND, prompt editing, emphasis, BREAK and CLIP skip go through its path."""
    from modules import shared
    prompt = "a [red:blue:2] photo of (*s:1.3) AND a dog BREAK with *s:0.7 AND [[*s]] at night"
    old_skip = shared.opts.CLIP_stop_at_last_layers
    results = {}
    try:
        for skip in (1, 2):
            shared.opts.CLIP_stop_at_last_layers = skip
            rows = _held_job(prompt, f"CLIP skip {skip}")
            results[f"skip{skip}"] = {"calls": len(rows), "rows": rows[0]["cond"].shape[0],
                                      "tokens": rows[0]["cond"].shape[1], "diff": _matches_static(rows, f"skip {skip}")}
    finally:
        shared.opts.CLIP_stop_at_last_layers = old_skip
    return results


def _held_job(prompt, what, slot_path=True, on_process=None, **kw):
    """A job with w held at the webui's own placeholder vector (so its static conds are the reference); checks
    which re-encoding path was taken (the slot encoder, or the webui's whole path); returns the probe's rows."""
    from e4t_a1111 import sampling
    sessions = []

    class Constant:
        history = []

        def __init__(self, w):
            self.w = w

        def reset(self):
            pass

        def __call__(self, unet, x, t, dtype=None, maps=None):
            return self.w.expand(x.shape[0], -1).clone()

    def hold(p):
        s = sampling.RUNTIME.session
        s.refinement = Constant(s.placeholder.embedding.vec[0].clone())
        sessions.append(s)

    ENV.probe.reset()
    try:
        generate(prompt, concept_args(), sampler="Euler", steps=4,
                 probes=[ProbeScript(on_process=on_process, on_sampling=hold)], **kw)
    finally:
        ENV.probe.active = False
    paths = {type(v).__name__ for s in sessions for v in s._slots.values()}
    check(paths == ({"SlotSchedule"} if slot_path else {"NoneType"}), f"{what}: re-encoded through {paths}")
    return ENV.probe.cond_rows


# Tolerance of the per-step re-encoding against the webui's own encoding, relative to the encoding's largest
# value: the slot encoder runs the CLIP's own layers with another attention kernel (SDPA over the positions
# from the slot on, against transformers' eager attention), which differs in float rounding only. Measured on
# the tiny CLIP (fp32): 3e-7-8e-7 of the scale without emphasis, up to 4.2e-6 where "Original" emphasis divides
# by the chunk's mean; a deliberate error fails: w scaled by 1 + 1e-4 gives 3.0e-5, the slot one position off
# 0.41, the emphasis skipped 0.23 (BENCHMARKS.md, A1111 section).
REENCODING_TOLERANCE = 1e-5


def _matches_static(rows, what):
    """Every recorded re-encoded conditioning equals the webui's static one to REENCODING_TOLERANCE (and the
    slot encoder was the path taken); returns the largest difference relative to the scale."""
    import torch
    check(rows, "no denoiser calls recorded")
    worst = 0.0
    for r in rows:
        check(r["cond"].shape == r["static"].shape, f"shape {tuple(r['cond'].shape)} vs {tuple(r['static'].shape)}")
        scale = r["static"].abs().max().item()
        diff = (r["cond"] - r["static"]).abs().max().item() / scale
        check(torch.isfinite(r["cond"]).all() and diff <= REENCODING_TOLERANCE,
              f"{what}, step {r['step']}: re-encoded conditioning differs from the webui's by {diff:.3g} of its "
              f"scale {scale:.3g} (tolerance {REENCODING_TOLERANCE})")
        worst = max(worst, diff)
    return worst


@case()
def test_nested_job_does_not_get_the_outer_session():
    """A job run inside an E4T job (ADetailer's inner img2img) gets neither the outer prompt re-encoded
    nor the outer concept's weight hooks, and the outer job's refinement goes on after it."""
    import torch
    from e4t_a1111 import sampling
    hooks_before = hook_count()
    inner = {}

    def nested(p):
        if inner:
            return
        inner["outer_session"] = sampling.RUNTIME.session
        inner["outer_hooks"] = hook_count()
        inner["p"], _ = generate("a photo of *s, outdoors", steps=2, img2img=True)
        inner["after"] = hook_count()
    ENV.probe.reset()
    try:
        outer_p, res = generate("a photo of *s", concept_args(), steps=3, probes=[ProbeScript(on_sampling=nested)])
    finally:
        ENV.probe.active = False
    rows = ENV.probe.cond_rows
    inner_rows = [r for r in rows if r["job"] == id(inner["p"])]
    outer_rows = [r for r in rows if r["job"] == id(outer_p)]
    check(inner_rows and outer_rows, f"denoiser calls: {len(inner_rows)} inner, {len(outer_rows)} outer")
    for r in inner_rows:
        check(torch.equal(r["cond"], r["static"]), "the nested job's conditioning was re-encoded by the outer session")
        check(r["hooks"] == hooks_before + 1, f"the nested job ran with {r['hooks'] - hooks_before - 1} extra hooks "
                                              f"(the outer concept's weight hooks)")   # +1: the outer job's guard
    check(inner["after"] == inner["outer_hooks"], "the outer session's hooks were not restored after the nested job")
    check(all(not torch.equal(r["cond"], r["static"]) for r in outer_rows), "the outer job was not refined after "
                                                                            "the nested job")
    check("E4T: tiny-concept" in res.info, "no E4T in the outer infotext")
    check(sampling.RUNTIME.session is None and hook_count() == hooks_before, "state left after the jobs")
    return {"inner_calls": len(inner_rows), "outer_calls": len(outer_rows)}


@case()
def test_offsets_stack_with_lora_and_are_removed():
    import torch.nn.functional as F
    from modules import sd_hijack
    from e4t_a1111 import sampling
    module, lora_delta = ENV.lora_module, ENV.lora_delta
    w0 = ENV.snapshot["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    hooks_before = hook_count()
    captured = []

    def capture(p):
        def hook(mod, args, out):
            captured.append((args[0].detach().clone(), out.detach().clone(), mod.weight.detach().clone()))
        ENV.capture = module.register_forward_hook(hook)     # after E4T's hook: sees the final output

    def release(p):
        ENV.capture.remove()

    strength = 0.7
    concept = sampling.concept("tiny-concept")
    generate("a photo of *s <lora:e4ttest:1>", concept_args(strength=strength), steps=2,
             probes=[ProbeScript(on_process=capture, on_post=release)])
    check(captured, "the LoRA'd projection was never called")
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    d, o = concept.unet_delta[key].float(), concept.deltas[key]
    worst_lora, worst_out = 0.0, 0.0
    for x, out, w in captured:
        worst_lora = max(worst_lora, (w - (w0 + lora_delta)).abs().max().item())
        expected = F.linear(x, (w + strength * d) * (1 + strength * o))
        worst_out = max(worst_out, ((out - expected).abs().max() / expected.abs().max()).item())
    check(worst_lora < 1e-6, f"weight during sampling is not W0 + LoRA (max diff {worst_lora})")
    check(worst_out < 1e-5, f"output is not x @ ((W0 + LoRA + sD)(1 + sΔW))ᵀ (max rel diff {worst_out})")
    check(hook_count() == hooks_before, f"{hook_count() - hooks_before} hooks left after the job")
    check("*s" not in sd_hijack.model_hijack.embedding_db.word_embeddings, "placeholder embedding left registered")
    lora_only = changed_tensors(ENV.snapshot)
    check(lora_only == ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
          f"after the job, tensors other than the LoRA'd one differ from the checkpoint: {lora_only[:5]}")
    generate("a photo of a cat", steps=2)                    # no LoRA, no E4T: Lora restores its backup
    left = changed_tensors(ENV.snapshot)
    check(not left, f"weights not bit-identical after E4T + LoRA were removed: {left[:5]}")
    return {"captured_calls": len(captured), "max_rel_err": worst_out}


@case()
def test_weight_cache_gives_bit_identical_images():
    """The hooks' cached weight changes (once per module and weight version) against computing them on every
    call: identical images, also when a LoRA is applied and removed between jobs (Lora edits in place)."""
    import numpy as np
    from e4t_a1111 import hooks
    prompts = ["a photo of *s <lora:e4ttest:1>", "a photo of *s", "a photo of *s <lora:e4ttest:1>"]

    def run(prompt):
        _, res = generate(prompt, concept_args(), steps=3)
        return np.asarray(res.images[0]).copy()

    cached = [run(prompt) for prompt in prompts]
    original = hooks._weight_key
    hooks._weight_key = lambda *args: None                  # every call computes W' - W afresh
    try:
        uncached = [run(prompt) for prompt in prompts]
    finally:
        hooks._weight_key = original
    for prompt, a, b in zip(prompts, cached, uncached):
        check(np.array_equal(a, b), f"{prompt!r}: the image with cached weight changes differs from the uncached one "
                                    f"by up to {np.abs(a.astype(int) - b.astype(int)).max()}")
    check(not np.array_equal(cached[0], cached[1]), "the LoRA changed nothing: the case cannot tell")
    check(np.array_equal(cached[0], cached[2]), "the LoRA job after a job without it gave another image")
    return {"jobs": len(prompts) * 2}


@case()
def test_negative_pass_is_shared_with_the_feature_pass():
    """With an empty negative prompt the feature pass's maps stand in for the negative's down/mid blocks: in the
    webui's U-Net call the down path computes the prompt rows only, the up path all rows, and w and the images
    equal those of the whole call to rounding (Euler and DDIM, 1 and 2 images); a negative prompt, or the setting
    off, leaves the call whole."""
    import numpy as np
    from e4t_a1111 import shared_pass

    def run(sampler="Euler", negative="", batch=1):
        seen = {"down": [], "up": []}
        probes = [ENV.unet.input_blocks[0][0].register_forward_hook(lambda m, a, o: seen["down"].append(a[0].shape[0])),
                  ENV.unet.output_blocks[0][0].register_forward_hook(lambda m, a, o: seen["up"].append(a[0].shape[0]))]
        ENV.probe.reset()
        try:
            _, res = generate("a photo of *s", concept_args(), sampler=sampler, steps=3, negative=negative, batch=batch)
        finally:
            for probe in probes:
                probe.remove()
        return dict(seen, vecs=[r["vec"] for r in ENV.probe.cond_rows],
                    images=[np.asarray(image).astype(int) for image in res.images[:batch]])

    found, hooks_before = {}, hook_count()
    default_setting = e4t_setting("e4t_share_negative_pass", True)
    try:
        for sampler, batch in (("Euler", 1), ("DDIM", 2)):
            shared = run(sampler, batch=batch)
            reason, shared_pass.unsupported = shared_pass.unsupported, (lambda *args: "the test's reference")
            try:
                whole = run(sampler, batch=batch)
            finally:
                shared_pass.unsupported = reason
            # per step: the feature pass (the images' rows), then the webui's call
            check(shared["down"] == [batch, batch] * 3 and shared["up"] == [2 * batch] * 3,
                  f"{sampler}: down-path batches {shared['down']}, up-path {shared['up']} (want the prompt rows "
                  f"only in the webui's down path)")
            check(whole["down"] == [batch, 2 * batch] * 3, f"{sampler}: reference batches {whole['down']}")
            w_err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(shared["vecs"], whole["vecs"]))
            check(w_err < 1e-5, f"{sampler}: w differs from the whole call's by {w_err:.2e} (relative)")
            image_err = max(np.abs(a - b).max() for a, b in zip(shared["images"], whole["images"]))
            check(image_err <= 1, f"{sampler}: images differ by up to {image_err} levels")
            found[sampler] = {"w_rel_err": w_err, "image_levels": int(image_err)}
        negative = run(negative="blurry")
        check(negative["down"] == [1, 2] * 3, f"with a negative prompt: down-path batches {negative['down']}")
        e4t_setting("e4t_share_negative_pass", False)
        off = run()
        check(off["down"] == [1, 2] * 3, f"with the setting off: down-path batches {off['down']}")
    finally:
        e4t_setting("e4t_share_negative_pass", default_setting)
    check(default_setting is True, f"sharing is {default_setting!r} by default")
    check(hook_count() == hooks_before, f"{hook_count() - hooks_before} hooks or forwards left on the model")
    return found


@case()
def test_failed_setup_fails_the_job_with_a_clear_message():
    from e4t_a1111 import sampling
    hooks_before = hook_count()
    try:
        generate("a photo of *s", concept_args(name="no-such-concept"), steps=2)
    except Exception as err:
        message = str(err)
    else:
        raise AssertionError("a job with a missing concept produced images")
    check("no E4T concept named 'no-such-concept'" in message, f"unclear error: {message}")
    check(sampling.RUNTIME.session is None and hook_count() == hooks_before, "state left after the failed job")
    generate("a photo of a cat", steps=2)
    return {"message": message}


@case()
def test_tune_inside_webui_saves_a_concept():
    import numpy as np
    import torch
    from PIL import Image
    import e4t
    from modules import call_queue, shared
    _, _, store, tuning, ui = e4t_modules()
    # a LoRA from an earlier job is still applied in place: the tune must start from the plain model
    generate("a photo of a cat <lora:e4ttest:1>", steps=2)
    check(changed_tensors(ENV.snapshot), "the LoRA is not applied in place before the tune")
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (72, 56, 3), dtype=np.uint8))
    mask = Image.fromarray((np.arange(56)[None, :].repeat(72, 0) > 20).astype(np.uint8) * 255)
    t0 = time.time()
    tune = call_queue.wrap_gradio_gpu_call(ui.run_tune, extra_outputs=[None, ""])
    plot, _, message = tune("task(e4ttest)", "tiny-e4t", image, mask, "face", "tuned/test", "published", 2, 1e-3,
                            1e-4, 2, 64, "all", 1, 0, False, "face")      # an uploaded mask wins over "face"
    seconds = time.time() - t0
    check(plot is not None and "Saved" in message, f"tune failed: {message}")
    check(plot.size == (512, 320), f"loss plot size {plot.size}")
    path = os.path.join(ENV.e4t_dir, "tuned", "test.safetensors")
    concept = e4t.load(path, find_source=store.source_path)
    source = e4t.load(os.path.join(ENV.e4t_dir, "tiny-e4t.safetensors"))
    check(concept.concept_tokens is not None and concept.concept_image.shape == (72, 56, 3), "concept data missing")
    check(concept.config.concept["image_sha256"] == tuning.image_sha256(image), "image hash missing")
    check(len(concept.config.concept["losses"]) == 2 and concept.config.concept["host"] == "a1111", "tune record missing")
    check(concept.config.concept["mask"] == "uploaded", f"mask source {concept.config.concept.get('mask')!r}")
    check(len(concept.unet_delta) == len(list(ENV.unet.parameters())), "tuned U-Net delta incomplete")
    check(any(v.float().abs().max() > 0 for v in concept.unet_delta.values()), "the U-Net delta is zero")
    src, new = source.offsets.state_dict(), concept.offsets.state_dict()
    check(any(not torch.equal(src[k], new[k]) for k in src), "offsets were not trained")
    check("tuned/test" in store.names(store.CONCEPT), f"concept not listed: {store.names(store.CONCEPT)}")
    left = changed_tensors(ENV.snapshot)
    check(not left, f"the tune changed the webui's model: {left[:5]}")
    # interrupted after the first step: nothing written
    shared.state.interrupted = False

    def stop_after_first(step, total, loss):
        shared.state.interrupted = True
    try:
        tuning.tune("tiny-e4t", image, None, "face", "tuned/stopped", e4t.preset("published", steps=3, batch_size=2,
                    resolution=64), progress=stop_after_first, should_stop=lambda: shared.state.interrupted)
    except e4t.Interrupted:
        pass
    else:
        raise AssertionError("the tune did not stop on shared.state.interrupted")
    finally:
        shared.state.interrupted = False
    check(not os.path.exists(os.path.join(ENV.e4t_dir, "tuned", "stopped.safetensors")), "an interrupted tune saved")
    # 'overwrite' never replaces the E4T weights, and hidden names are refused
    for bad, wanted in (("tiny-e4t", "is not a concept"), (".hidden/x", "may not start with '.'")):
        try:
            tuning.tune("tiny-e4t", image, None, "face", bad, e4t.preset("published", steps=1, batch_size=1,
                        resolution=64), overwrite=True)
        except tuning.E4TError as err:
            check(wanted in str(err), f"unclear refusal for {bad!r}: {err}")
        else:
            raise AssertionError(f"tuning into {bad!r} was not refused")
    # the tuned concept samples
    _, res = generate("a photo of *s", concept_args(name="tuned/test"), steps=2)
    check("E4T: tuned/test" in res.info, "sampling with the tuned concept failed")
    return {"tune_s": round(seconds, 1), "message": message}


@case()
def test_tune_with_automatic_face_mask():
    """'Automatic mask: face': OpenCV finds the astronaut's face and the tune gets that mask; on noise the
    user reads 'no face found' in the tab's result and nothing is saved."""
    import numpy as np
    from PIL import Image
    import e4t
    from modules import call_queue
    _, _, _, tuning, ui = e4t_modules()
    tune = call_queue.wrap_gradio_gpu_call(ui.run_tune, extra_outputs=[None, ""])

    def run(image, name):
        return tune(f"task(e4t-{name})", "tiny-e4t", image, None, "face", f"masked/{name}", "published", 1, 1e-3,
                    1e-4, 1, 64, "attention", 1, 0, False, "face")
    try:
        import cv2  # noqa: F401
        opencv = True
    except ImportError:
        opencv = False
    noise = Image.fromarray(np.random.default_rng(7).integers(0, 255, (96, 80, 3), dtype=np.uint8))
    plot, _, message = run(noise, "noise")
    wanted = "no face found" if opencv else "opencv-python-headless<5"
    check(plot is None and "class='error'" in message and wanted in message, f"unclear message: {message}")
    check(not os.path.exists(os.path.join(ENV.e4t_dir, "masked", "noise.safetensors")), "a failed tune saved")
    if not opencv:
        return {"opencv": False, "message": message}
    try:
        import skimage.data
    except ImportError:
        return {"opencv": True, "astronaut": False, "message": message}
    astronaut = Image.fromarray(skimage.data.astronaut())
    given, original = [], e4t.tune

    def spy(*args, **kwargs):
        given.append(kwargs.get("mask"))
        return original(*args, **kwargs)
    e4t.tune = spy
    try:
        plot, _, saved = run(astronaut, "astronaut")
    finally:
        e4t.tune = original
    check(plot is not None and "Saved" in saved, f"tune with the automatic mask failed: {saved}")
    pixels = tuning.image_tensor(astronaut)
    expected = e4t.detect_mask((pixels.permute(1, 2, 0) + 1) / 2, "face")
    check(len(given) == 1 and given[0] is not None and given[0].shape == (512, 512) and
          bool((given[0] == expected).all()), "the tune did not get the detected face mask")
    record = e4t.read_header(os.path.join(ENV.e4t_dir, "masked", "astronaut.safetensors"))["concept"]
    check(record["mask"] == "face", f"concept record: mask {record.get('mask')}")
    return {"opencv": True, "astronaut": True, "message": message, "mask_fraction": float(given[0].mean())}


@case()
def test_tab_and_script_ui_build_and_infotext_restores():
    from modules import infotext_utils, script_callbacks, scripts, shared, ui as webui
    _, res = generate("a photo of *s", concept_args(), steps=2)      # an E4T image's infotext to paste
    info = res.info
    t0 = time.time()
    demo = webui.create_ui()
    seconds = time.time() - t0
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    for elem in ("e4t_weights", "e4t_image", "e4t_mask", "e4t_domain", "e4t_steps", "e4t_lr", "e4t_lambda",
                 "e4t_batch", "e4t_tune", "e4t_tune_plot", "e4t_auto_mask", "script_txt2img_e4t_e4t_concept",
                 "script_img2img_e4t_e4t_strength", "script_txt2img_e4t_e4t_t_stop", "script_txt2img_e4t_e4t_plot",
                 "script_img2img_e4t_e4t_plot"):
        check(elem in ids, f"UI element {elem!r} missing")
    fields = {name for _, name in scripts.scripts_txt2img.infotext_fields if isinstance(name, str)}
    check({"E4T enabled", "E4T strength", "E4T t_stop"} <= fields, f"paste fields: {fields}")
    plot_fields = [name for comp, name in scripts.scripts_txt2img.infotext_fields
                   if getattr(comp, "elem_id", None) == "script_txt2img_e4t_e4t_plot"]
    check(not plot_fields, f"'Plot the embedding' must not be restored from infotext: {plot_fields}")
    check("E4T" in scripts.scripts_txt2img.paste_field_names, "E4T not in send-to fields")
    # the webui's real paste path (infotext_utils.connect_paste's paste_func) sets every E4T component
    clicks = []

    class Button:
        def click(self, fn=None, **kwargs):
            clicks.append(fn)
    infotext_utils.connect_paste(Button(), list(scripts.scripts_txt2img.infotext_fields), None, None, "txt2img")
    outputs = [comp for comp, _ in scripts.scripts_txt2img.infotext_fields]
    updates = dict(zip([getattr(c, "elem_id", None) for c in outputs], clicks[0](info)))
    pasted = {k: updates[f"script_txt2img_e4t_e4t_{k}"].get("value") for k in ("enabled", "concept", "strength", "t_stop")}
    check(pasted["enabled"] is True and pasted["concept"] == "tiny-concept" and float(pasted["strength"]) == 1.0
          and float(pasted["t_stop"]) == 0, f"the webui's paste set {pasted}")
    check("e4t_keep_weights_loaded" in shared.opts.data_labels, "settings section missing")
    # paste: the infotext of an E4T image turns E4T on with its concept, strength and t_stop
    params = infotext_utils.parse_generation_parameters(info)
    script_callbacks.infotext_pasted_callback(info, params)
    check(params.get("E4T enabled") is True and params.get("E4T") == "tiny-concept" and
          float(params.get("E4T strength")) == 1.0 and int(params.get("E4T t_stop")) == 0, f"pasted: {params}")
    # a renamed concept is found by the hash recorded in the infotext
    renamed = info.replace("E4T: tiny-concept", "E4T: old-name")
    params = infotext_utils.parse_generation_parameters(renamed)
    script_callbacks.infotext_pasted_callback(renamed, params)
    check(params.get("E4T") == "tiny-concept", f"hash lookup failed: {params.get('E4T')}")
    params = infotext_utils.parse_generation_parameters("a cat\nSteps: 3, Sampler: Euler, Seed: 1")
    script_callbacks.infotext_pasted_callback("", params)
    check(params.get("E4T enabled") is False, "pasting an infotext without E4T must turn E4T off")
    return {"create_ui_s": round(seconds, 1)}


@case()
def test_bad_inputs_are_refused_with_what_to_do():
    """Per class of bad input, in the tab and the always-on script: one message saying what to do; same
    rules as the ComfyUI nodes (e4t.validate); same seed, same concept; broken files named."""
    import numpy as np
    import torch
    from PIL import Image
    import e4t
    from modules import call_queue
    _, _, store, tuning, ui = e4t_modules()
    tune = call_queue.wrap_gradio_gpu_call(ui.run_tune, extra_outputs=[None, ""])
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (72, 56, 3), dtype=np.uint8))
    black = Image.new("L", (56, 72))
    speck = Image.new("L", (56, 72))
    speck.paste(255, (0, 0, 4, 4))                                       # 0.4 %: empty by the one rule
    messages = {}
    for label, (img, mask, lr, seed), wanted in (
            ("black mask", (image, black, 1e-3, 0), "covers 0.00 %"), ("speck mask", (image, speck, 1e-3, 0), "less than 1 %"),
            ("mask shape", (image, Image.new("L", (100, 40), 255), 1e-3, 0), "must have the image"),
            ("nan lr", (image, None, float("nan"), 0), "learning rate is nan"), ("no seed", (image, None, 1e-3, None), "seed is None"),
            ("tiny image", (Image.new("RGB", (8, 8)), None, 1e-3, 0), "at least 16"), ("no image", (None, None, 1e-3, 0), "upload")):
        plot, _, message = tune(f"task(bad-{label})", "tiny-e4t", img, mask, "face", f"bad/{label.replace(' ', '-')}",
                                "published", 1, lr, 1e-4, 1, 64, "all", 1, seed, False, "none")
        check(plot is None and "class='error'" in message and wanted in message, f"{label}: {message}")
        messages[label] = message
    check(not os.path.exists(os.path.join(ENV.e4t_dir, "bad")), "a refused tune wrote a file")
    # numbers of the always-on script
    try:
        generate("a photo of *s", concept_args(strength=float("nan")), steps=2)
    except Exception as err:
        messages["nan strength"] = str(err)
    else:
        raise AssertionError("sampling with strength NaN ran")
    check("E4T strength is nan" in messages["nan strength"], messages["nan strength"])
    # broken files: a zero-byte concept; a published folder the webui's safe-unpickle check refuses
    with open(os.path.join(ENV.e4t_dir, "broken.safetensors"), "wb"):
        pass
    try:
        generate("a photo of *s", concept_args(name="broken"), steps=2)
    except Exception as err:
        messages["empty concept"] = str(err)
    else:
        raise AssertionError("sampling with an empty concept file ran")
    check("broken.safetensors is empty (0 bytes)" in messages["empty concept"], messages["empty concept"])
    folder = os.path.join(ENV.e4t_dir, "refused-face")
    os.makedirs(folder, exist_ok=True)
    weights = e4t.load(os.path.join(ENV.e4t_dir, "tiny-e4t.safetensors"))
    torch.save({**weights.encoder.state_dict(), "flag": torch.ones(1, dtype=torch.bool)}, os.path.join(folder, "encoder.pt"))
    torch.save({"x": torch.ones(1)}, os.path.join(folder, "weight_offsets.pt"))
    plot, _, message = tune("task(bad-refused)", "refused-face", image, None, "face", "bad/refused", "published", 1,
                            1e-3, 1e-4, 1, 64, "all", 1, 0, False, "none")
    check(plot is None and "safe-unpickle check refused" in message and "forbidden" in message
          and "python -m e4t convert" in message and "NoneType" not in message, f"refused pickle: {message}")
    messages["refused pickle"] = message
    # last (slow): grey (L) and RGBA images tune as their RGB; the same seed gives the same concept bit for bit,
    # whatever ran before, with two CPU threads (one thread hid MKL's run-to-run SGEMM order: e4t.seeding)
    from e4t.seeding import reproducible_cpu_math
    check(reproducible_cpu_math() is not False, "MKL's reproducible mode is off: preload.py did not run first")
    cfg = e4t.preset("published", steps=1, batch_size=1, resolution=64, lr=1e-3, seed=4)
    concepts, threads = {}, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, img in (("grey", image.convert("L")), ("grey-rgb", image.convert("L").convert("RGB")),
                          ("rgba", image.convert("RGBA")), ("rgb", image)):
            torch.manual_seed(len(name) * 7)
            torch.randn(len(name) * 3)
            path, _ = tuning.tune("tiny-e4t", img, None, "face", f"seeded/{name}", cfg, overwrite=True)
            concepts[name] = e4t.load(path, find_source=store.source_path)
    finally:
        torch.set_num_threads(threads)
    parts = {"U-Net delta": lambda c: c.unet_delta,                     # heads: the encoder less its ViT (on meta)
             "head": lambda c: {k: v for k, v in c.encoder.state_dict().items() if not k.startswith("clip_vision.")},
             "offset": lambda c: c.offsets.state_dict()}
    for a, b in (("grey", "grey-rgb"), ("rgba", "rgb")):
        for part, of in parts.items():
            x, y = of(concepts[a]), of(concepts[b])
            differ = [k for k in x if not torch.equal(x[k], y[k])]
            check(x.keys() == y.keys() and not differ, f"{a} and {b}: {len(differ)} of {len(x)} {part} tensors differ "
                                                       f"(first: {differ[:3]})")
    messages["same seed"] = f"bit-identical: {len(concepts['rgb'].unet_delta)} deltas, 2 threads"
    return {k: v[-300:] for k, v in messages.items()}


@case("medvram", "lowvram")
def test_low_vram_sampling_works_and_tuning_refuses():
    from modules import shared
    from e4t_a1111 import tuning
    import e4t
    from PIL import Image
    from e4t_a1111.host import E4TError
    check(ENV.sd_model.lowvram, "the model is not in low-VRAM mode")
    ENV.probe.reset()
    seen, handles = ENV.probe.unet_inputs()
    try:
        _, res = generate("a photo of *s", concept_args(), steps=3)
    finally:
        ENV.probe.active = False
        for h in handles:
            h.remove()
    wanted = ENV.sd_model.model if shared.cmd_opts.medvram else ENV.unet.input_blocks[0]
    check(all(g is wanted for g in seen["gpu"]), f"U-Net block 0 ran while {set(type(g).__name__ for g in seen['gpu'])} "
                                                f"was the module on the device")
    check("E4T: tiny-concept" in res.info, "no E4T in the infotext")
    try:
        tuning.tune("tiny-e4t", Image.new("RGB", (64, 64)), None, "face", "x", e4t.preset("published"))
    except E4TError as err:
        message = str(err)
    else:
        raise AssertionError("tuning ran under low-VRAM mode")
    check("--medvram" in message, f"unclear refusal: {message}")
    return {"calls": len(ENV.probe.cond_rows), "refusal": message}


@case()
def test_newcomer_tab_hints_and_api_warning():
    """An empty weights folder is created and the tab says where weights go and where to get them; the status
    box has a label; a job whose prompt lacks the placeholder warns in what the API returns."""
    import json as _json
    import tempfile
    from modules import shared
    from e4t_a1111 import ui
    check("e4t_tune_progress').innerHTML = ''" in ui.TUNE_JS.split("function(progress)")[0],
          "the progress text is not cleared when the tune ends (a failed job would keep 'Waiting...')")
    saved = shared.cmd_opts.e4t_dir
    empty = os.path.join(tempfile.mkdtemp(), "models", "e4t")
    shared.cmd_opts.e4t_dir = empty
    try:
        blocks = ui.tab()[0][0]
        check(os.path.isdir(empty), "the tab did not create the E4T folder")
        comps = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
        hint = comps["e4t_weights_hint"].value
        check("No E4T weights yet" in hint and empty in hint and "mkshing/e4t-diffusion-ffhq-celebahq-v1" in hint
              and "e4t_cli.py convert" in hint, f"hint: {hint}")
        status = comps["e4t_tune_output"]
        check(status.label == "Status" and status.show_label, f"status box label {status.label!r}")
    finally:
        shared.cmd_opts.e4t_dir = saved
    check(ui.weights_hint().startswith("E4T weights are read from"), f"hint with weights: {ui.weights_hint()}")
    _, res = generate("a photo of a cat", concept_args(), steps=2)
    info = _json.loads(res.js())
    warning = info["extra_generation_params"].get("E4T warning", "")
    check("placeholder *s" in warning and "E4T warning" in info["infotexts"][0], f"API info: {info}")
    check("E4T: tiny-concept" in info["infotexts"][0], "E4T missing from the infotext")
    _, res = generate("a photo of *s", concept_args(), steps=2)
    check("E4T warning" not in res.js(), "warning without cause")
    return {"hint": hint[:80], "warning": warning}


@case()
def test_reencoding_matches_webui_for_long_prompts_batches_and_emphasis_options():
    """The slot encoder equals the webui's encoding also for a prompt past 75 tokens (the placeholder in its
    second chunk, the first chunk encoded once), a batch of two images with different prompts (their words in
    one call), a schedule that switches the placeholder in, a user's two-vector textual-inversion embedding
    next to the placeholder, and each of the webui's emphasis options; the old emphasis implementation,
    which it does not rebuild, goes through the webui's path and matches too."""
    import torch
    from modules import sd_hijack, shared
    from modules.textual_inversion.textual_inversion import Embedding
    long = "a photo of " + "very " * 80 + "(*s:1.2) wearing a [[hat]]"
    prompts = ["a (photo:1.4) of *s", "[a cat:*s:2] on a (red:0.8) sofa"]
    width = ENV.sd_model.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight.shape[1]
    torch.manual_seed(7)
    user = Embedding(torch.randn(2, width), "tinystyle")
    user.vectors, user.shape, user.filename = 2, width, None

    def register(p):                   # after the webui's embeddings reload, as a user's file would be there
        sd_hijack.model_hijack.embedding_db.register_embedding(user, ENV.sd_model)
    old = shared.opts.emphasis, shared.opts.use_old_emphasis_implementation
    results = {}
    try:
        for emphasis in ("Original", "No norm", "Ignore", "None"):
            shared.opts.emphasis = emphasis
            rows = _held_job(long, f"emphasis {emphasis}")
            check(rows[0]["cond"].shape[1] == 154, f"long prompt: {rows[0]['cond'].shape[1]} tokens, expected 154")
            results[f"long, {emphasis}"] = _matches_static(rows, f"long prompt, emphasis {emphasis}")
            rows = _held_job(prompts, f"batch, emphasis {emphasis}", batch=2)
            check(rows[0]["cond"].shape[0] == 2, f"batch: {rows[0]['cond'].shape[0]} rows")
            results[f"batch, {emphasis}"] = _matches_static(rows, f"batch of two, emphasis {emphasis}")
        shared.opts.emphasis = "Original"
        rows = _held_job("tinystyle portrait of (*s:1.1), tinystyle", "embedding", on_process=register)
        results["textual inversion"] = _matches_static(rows, "textual inversion")
        shared.opts.use_old_emphasis_implementation = True
        results["old emphasis"] = _matches_static(_held_job(long, "old emphasis", slot_path=False), "old emphasis")
    finally:
        shared.opts.emphasis, shared.opts.use_old_emphasis_implementation = old
        sd_hijack.model_hijack.embedding_db.register_embedding_by_name(None, ENV.sd_model, "tinystyle")
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--webui", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", default="normal", choices=["normal", "medvram", "lowvram"])
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    t0 = time.time()
    start_webui(os.path.abspath(args.webui), os.path.abspath(args.data), args.mode)
    print(f"\nE4T-HARNESS webui ready in {time.time() - t0:.1f}s", flush=True)
    unknown = [name for name in args.only or () if name not in CASES]
    check(not unknown, f"no such cases: {unknown}")
    for name in args.only or CASES:
        fn, modes = CASES[name]
        if args.mode not in modes:
            continue
        t = time.time()
        try:
            details = fn() or {}
            result = {"case": name, "ok": True, "details": details}
        except Exception as err:
            result = {"case": name, "ok": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()}
        result["seconds"] = round(time.time() - t, 1)
        print("\nE4T-RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
