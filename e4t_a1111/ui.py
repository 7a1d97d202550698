"""Gradio parts (gradio 3.41, as A1111 1.10 ships): the E4T tab and the txt2img/img2img accordion."""
import html
import os

import torch

import e4t

from . import host, sampling, store, tuning

# Starts the webui's progress bar for the tune (its requestProgress/randomId, as the TI train tab does).
TUNE_JS = """
function(...args) {
    var id = randomId();
    gradioApp().getElementById('e4t_tune_progress').innerHTML = '';
    requestProgress(id, gradioApp().getElementById('e4t_tune_output'), gradioApp().getElementById('e4t_tune_plot'),
        function() {
            // the last poll's text ("Waiting..." when the job failed before it started) must not stay
            gradioApp().getElementById('e4t_tune_progress').innerHTML = '';
        }, function(progress) {
            gradioApp().getElementById('e4t_tune_progress').innerHTML = progress.textinfo || '';
        });
    args[0] = id;
    return args;
}
"""

INFOTEXT = {"enabled": "E4T enabled", "concept": "E4T", "strength": "E4T strength", "t_stop": "E4T t_stop"}
# "Plot the embedding" is deliberately not in the infotext: it changes no pixel of the images (it only adds
# a report image), so pasting an image's parameters leaves the checkbox as the user set it.
AUTO_MASKS = ["none", *e4t.CASCADES]
MEMORY_MODES = ["auto", *e4t.MEMORY_MODES, "custom"]


def _forge_tab():
    import gradio as gr
    with gr.Blocks(analytics_enabled=False) as block:
        gr.Markdown(host.FORGE_MESSAGE)
    return [(block, "E4T", "e4t")]


def tab():
    """on_ui_tabs: choose weights, one image (+ mask, or an automatic face/cat mask), domain word, steps, lr, λ,
    batch; Tune."""
    import gradio as gr
    from modules import call_queue, shared, ui_common

    if host.is_forge():
        return _forge_tab()
    os.makedirs(store.folder(), exist_ok=True)       # where the hint below tells users to put the weights
    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                with gr.Row():
                    weights = gr.Dropdown(label="E4T weights", choices=store.names(store.WEIGHTS), elem_id="e4t_weights")
                    refresh = ui_common.create_refresh_button(weights, lambda: None,
                                                              lambda: {"choices": store.names(store.WEIGHTS)},
                                                              "e4t_weights_refresh")
                hint = gr.Markdown(weights_hint(), elem_id="e4t_weights_hint")
                refresh.click(fn=weights_hint, inputs=[], outputs=[hint], show_progress=False)
                with gr.Row():
                    image = gr.Image(label="Concept image", type="pil", source="upload", elem_id="e4t_image")
                    mask = gr.Image(label="Mask (optional; white = the concept)", type="pil", source="upload",
                                    image_mode="L", elem_id="e4t_mask")
                with gr.Row():
                    auto_mask = gr.Dropdown(label="Automatic mask (used when no mask is uploaded)", choices=AUTO_MASKS,
                                            value="none", elem_id="e4t_auto_mask")
                with gr.Row():
                    domain = gr.Textbox(label="Domain word", placeholder="the weights' own (e.g. face)",
                                        elem_id="e4t_domain")
                    name = gr.Textbox(label="Concept name", placeholder="e.g. anna", elem_id="e4t_name")
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=list(e4t.PRESETS), value="published", elem_id="e4t_preset")
                    steps = gr.Slider(1, 50, value=15, step=1, label="Steps", elem_id="e4t_steps")
                    batch = gr.Slider(1, 32, value=16, step=1, label="Batch size", elem_id="e4t_batch")
                with gr.Row():
                    lr = gr.Number(value=1.6e-5, label="Learning rate", elem_id="e4t_lr")
                    reg = gr.Number(value=e4t.TuneConfig.reg_lambda, label="λ (regularisation)", elem_id="e4t_lambda")
                memory = gr.Radio(MEMORY_MODES, value="auto", label="Memory mode", elem_id="e4t_memory",
                                  info="auto: fast where its estimated peak fits the GPU (about 49 GiB), else low_vram (same recipe, a fraction of "
                                       "the memory, slower); custom: the three settings under Advanced")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        resolution = gr.Slider(256, 1024, value=512, step=64, label="Resolution", elem_id="e4t_resolution")
                        micro = gr.Slider(1, 16, value=1, step=1, label="Micro-batches per step (custom memory mode)",
                                          elem_id="e4t_accumulation")
                        checkpointing = gr.Checkbox(False, label="Gradient checkpointing (custom memory mode)",
                                                    elem_id="e4t_checkpointing")
                        compact = gr.Checkbox(False, label="Adam moments in bf16 (custom memory mode)",
                                              elem_id="e4t_compact_optimizer")
                    with gr.Row():
                        trains = gr.Radio(["all", "attention"], value="all", label="U-Net weights trained",
                                          elem_id="e4t_trains")
                        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="e4t_seed")
                overwrite = gr.Checkbox(False, label="Overwrite a concept of the same name", elem_id="e4t_overwrite")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id="e4t_interrupt")
                    run = gr.Button("Tune", variant="primary", elem_id="e4t_tune")
            with gr.Column(variant="panel"):
                output = gr.Text(value="", label="Status", placeholder="the tune's progress bar shows here; "
                                 "results and errors below", interactive=False, elem_id="e4t_tune_output")
                plot = gr.Image(label="Tuning loss", type="pil", interactive=False, elem_id="e4t_tune_plot")
                gr.HTML(elem_id="e4t_tune_progress")
                result = gr.HTML(elem_id="e4t_tune_result")
        task_id = gr.Textbox(visible=False)

        preset.change(fn=preset_values, inputs=[preset], outputs=[steps, lr, reg], show_progress=False)
        weights.change(fn=domain_word_of, inputs=[weights], outputs=[domain], show_progress=False)
        interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
        run.click(fn=call_queue.wrap_gradio_gpu_call(run_tune, extra_outputs=[None, ""]), _js=TUNE_JS,
                  inputs=[task_id, weights, image, mask, domain, name, preset, steps, lr, reg, batch, resolution,
                          trains, micro, seed, overwrite, auto_mask, checkpointing, compact, memory],
                  outputs=[plot, output, result])
    return [(block, "E4T", "e4t")]


PUBLISHED = "https://huggingface.co/mkshing/e4t-diffusion-ffhq-celebahq-v1"


def weights_hint() -> str:
    """Under the weights dropdown: where E4T weights go and, while there are none, where to get them."""
    root = store.folder()
    if store.names(store.WEIGHTS):
        return f"E4T weights are read from `{root}`."
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (f"**No E4T weights yet.** Put them in `{root}`: download `config.json`, `encoder.pt` and "
            f"`weight_offsets.pt` of [mkshing/e4t-diffusion-ffhq-celebahq-v1]({PUBLISHED}) (the published face "
            f"model) into a sub-folder there (e.g. `{os.path.join(root, 'e4t-face')}`), or convert them to one "
            f"smaller file with `python {os.path.join(here, 'e4t_cli.py')} convert FOLDER "
            f"{os.path.join(root, 'e4t-face.safetensors')}`; then press the refresh button.")


def preset_values(name):
    cfg = e4t.preset(name)
    return cfg.steps, cfg.lr, cfg.reg_lambda


def domain_word_of(name):
    import gradio as gr
    try:
        return weights_config(name).domain_word
    except Exception:
        return gr.update()


def weights_config(name) -> e4t.DomainConfig:
    """The config of E4T weights, from the file header (no tensors read)."""
    from e4t import read_header, read_published_config
    path = store.path_of(name, store.WEIGHTS)
    return read_published_config(path) if os.path.isdir(path) else e4t.DomainConfig.from_json(read_header(path))


def run_tune(task_id, weights, image, mask, domain, name, preset, steps, lr, reg, batch, resolution, trains,
             micro, seed, overwrite, auto_mask="none", checkpointing=False, compact=False, memory="auto"):
    """The Tune button (inside wrap_gradio_gpu_call: the webui's queue lock, progress and interrupt)."""
    from modules import devices, shared
    sampling.RUNTIME.stop_all()                      # nothing of a failed earlier job may stay on the U-Net
    state = shared.state
    number = e4t.validate.number                     # form fields may be empty or NaN: say which, before int()
    if memory == "custom":
        settings = dict(accumulation=number("micro-batches per step", micro, 1, integer=True),
                        checkpointing=bool(checkpointing), optimizer_states="bf16" if compact else "fp32")
    else:
        settings = e4t.memory_settings(tuning.checked(lambda: e4t.memory_mode(
            memory, devices.device, None, trains, number("batch size", batch, 1, integer=True),
            number("resolution", resolution, 64, integer=True))))
    cfg = tuning.checked(lambda: e4t.preset(
        preset or "published", steps=number("steps", steps, 1, integer=True), lr=number("learning rate", lr, 0, 1),
        reg_lambda=number("λ", reg, 0), batch_size=number("batch size", batch, 1, integer=True),
        resolution=number("resolution", resolution, 64, integer=True), trains=trains,
        seed=number("seed", seed, 0, 2**64 - 1, integer=True), **settings))
    state.job, state.job_count, state.job_no = "E4T tune", 1, 0
    state.sampling_steps, state.sampling_step = cfg.steps, 0
    state.textinfo = "E4T: encoding the concept image"

    def progress(step, total, loss):
        state.sampling_step = step
        state.textinfo = f"E4T tune: step {step}/{total}, loss {loss:.4f}"

    notices = []
    try:
        path, losses = tuning.tune(weights, image, mask, domain, name, cfg, overwrite=bool(overwrite),
                                   progress=progress, should_stop=lambda: state.interrupted,
                                   auto_mask=auto_mask or "none", notice=notices.append)
    except e4t.Interrupted as err:
        return None, "", f"<p>{html.escape(str(err))}; no concept was saved.</p>"
    except e4t.Diverged as err:
        return None, "", f"<p>{html.escape(str(err))} No concept was saved.</p>"
    except torch.cuda.OutOfMemoryError:
        return None, "", ("<p>Out of GPU memory while tuning; no concept was saved. Choose the memory mode <i>low_vram</i>, train only "
                          "<i>attention</i>, or lower the batch size or resolution.</p>")
    plot = loss_plot(losses)
    concept = os.path.relpath(path, store.folder())[: -len(".safetensors")].replace(os.sep, "/")
    store.file_hash(path, concept)                  # into the webui's hash cache now, not at first use
    return plot, "", (f"<p>Saved <b>{html.escape(concept)}</b> to {html.escape(path)} after {len(losses)} steps "
                      f"(last loss {losses[-1]:.4f}).</p><p>In txt2img/img2img: open <i>E4T</i>, refresh, pick it, "
                      f"and write <code>{html.escape(_placeholder(path))}</code> in the prompt.</p>"
                      + "".join(f"<p>{html.escape(n)}.</p>" for n in notices))


def _placeholder(path):
    from e4t import read_header
    return read_header(path).get("placeholder", "*s")


def loss_plot(losses):
    from e4t import line_plot
    return _pil(line_plot(range(1, len(losses) + 1), losses, "E4T tuning loss", "step", "loss"))


def _pil(img):
    from PIL import Image
    return Image.fromarray(e4t.to_uint8(img).numpy())


def norm_plot(run, several: bool):
    """The ‖w − e_domain‖ of one sampler run over its timesteps (paper fig. 7) as a PIL image."""
    from e4t import line_plot
    points = run.points()
    title = "E4T: |w - e_domain| at each denoiser call"       # ASCII: Pillow's default font has no ‖ or −
    if several:
        title += f" (batch {run.iteration + 1}" + (", hires pass)" if run.hires else ")")
    elif run.hires:
        title += " (hires pass)"
    return _pil(line_plot([t for t, _ in points], [n for _, n in points], title, "timestep t", "norm"))


def add_norm_plots(processed, runs):
    """Append one plot per sampler run to the job's images, each with the job's infotext so the gallery's
    info, Save and Send-to keep working (they index `infotexts` by image)."""
    several = len(runs) > 1
    for run in runs:
        processed.images.append(norm_plot(run, several))
        processed.infotexts.append(processed.info)


def script_ui(script, is_img2img):
    """The accordion of the always-on script; sets the script's infotext fields (paste, send-to)."""
    import gradio as gr
    from modules import ui_common

    with gr.Accordion("E4T", open=False, elem_id=script.elem_id("e4t")):
        if host.is_forge():
            gr.Markdown(host.FORGE_MESSAGE)
            return []
        with gr.Row():
            enabled = gr.Checkbox(False, label="Enable", elem_id=script.elem_id("e4t_enabled"))
            concept = gr.Dropdown(label="Concept", choices=store.names(store.CONCEPT), elem_id=script.elem_id("e4t_concept"))
            ui_common.create_refresh_button(concept, lambda: None, lambda: {"choices": store.names(store.CONCEPT)},
                                            script.elem_id("e4t_concept_refresh"))
        with gr.Row():
            strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength (U-Net offsets and tuned weights)",
                                 elem_id=script.elem_id("e4t_strength"))
            t_stop = gr.Slider(0, 1000, value=0, step=1, label="t_stop (keep the embedding fixed below this timestep)",
                               elem_id=script.elem_id("e4t_t_stop"))
        with gr.Row():
            plot = gr.Checkbox(False, label="Plot the embedding (|w - e_domain| per step, added to the images)",
                               elem_id=script.elem_id("e4t_plot"))
        gr.Markdown("Write the concept's placeholder (`*s` unless it was made otherwise) in the prompt. Its word "
                    "embedding is predicted again at every sampling step.")
    components = {"enabled": enabled, "concept": concept, "strength": strength, "t_stop": t_stop, "plot": plot}
    script.infotext_fields = [(components[k], INFOTEXT[k]) for k in INFOTEXT]         # not "plot": see INFOTEXT
    # the Concept dropdown starts without a value: the webui's paste would call type(None)(name) and
    # silently skip it, so its key returns the update itself
    script.infotext_fields[list(INFOTEXT).index("concept")] = (concept, paste_concept)
    script.paste_field_names = list(INFOTEXT.values())
    return list(components.values())


def paste_concept(params):
    """Paste key of the Concept dropdown: the (already resolved) concept name as a gradio update."""
    import gradio as gr
    name = params.get(INFOTEXT["concept"])
    return gr.update(value=name) if name else None


def infotext_pasted(infotext, params):
    """on_infotext_pasted: E4T on exactly when the pasted parameters name a concept; the concept
    found locally by name, else by the hash recorded with it."""
    params[INFOTEXT["enabled"]] = "E4T" in params
    if "E4T" in params:
        params["E4T"] = store.find(params["E4T"], params.get("E4T hash"))


def settings():
    """on_ui_settings: the E4T section of the webui's settings."""
    from modules import shared
    section = ("e4t", "E4T")
    shared.opts.add_option("e4t_keep_weights_loaded", shared.OptionInfo(
        True, "Keep the last E4T weights file in RAM between tunes", section=section))
    shared.opts.add_option("e4t_share_negative_pass", shared.OptionInfo(
        True, "Refinement: with an empty negative prompt, the negative prompt's U-Net pass reuses the encoder's "
              "feature pass for its down and middle blocks (the same image to rounding, fewer operations)",
        section=section))
