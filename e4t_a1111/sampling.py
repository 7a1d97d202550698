"""A concept applied to one txt2img/img2img job: its weights on the U-Net's layers (`hooks`), and the
placeholder's embedding predicted again at every denoiser call.

Per call (`on_cfg_denoiser`): the images' current latents are turned into the U-Net's actual input
and timestep (k-diffusion: x·c_in and sigma_to_t(σ); timestep samplers such as DDIM: x_t and t as
they are), the U-Net down path gives the maps from which the folded encoder predicts w for each
image (with an empty negative prompt, its maps also stand in for the negative's down/mid blocks in the
webui's U-Net call: `shared_pass`), and
every positive sub-prompt that contains the placeholder is encoded again with w in the
placeholder's slot: from the webui's own chunks through `e4t.SlotEncoder` (`SlotSchedule`: only the
positions from the slot on, all images in one call), or through the webui's whole prompt path where
that cannot be reproduced exactly (`slot_text_unsupported`). Only `text_cond` changes; the negative
prompt's conditioning is left as the webui made it.

Lifecycle: `start` in Script.process (after the webui reloads its embeddings), `begin_pass` before
each sampler run (hires fix: twice), `stop` in Script.postprocess and at every entry point that may
follow a failed job. Errors are raised from the U-Net's first call (`_Guard`), because the webui
only logs exceptions from scripts and callbacks and would otherwise return images without E4T.

Embedding norms (paper fig. 7): every call that predicts w also records (timestep, ‖w − e_domain‖
averaged over the batch) in the current sampler run's `NormRun`; `Runtime.norm_runs()` hands them
to Script.postprocess, which plots them when "Plot the embedding" is ticked.
"""
import logging

import torch

import e4t

from . import host, shared_pass, store
from .hooks import WeightHooks
from .host import E4TError

log = logging.getLogger("e4t")


class Concept:
    """What sampling needs from a concept file, derived once per file version (CPU). The encoder's
    129 head matrices are folded into one and then dropped; the tuned U-Net delta is kept."""

    def __init__(self, name: str, path: str):
        try:
            weights = e4t.load(path, find_source=store.source_path)
        except e4t.E4TFileError as err:
            raise E4TError(str(err)) from None
        if weights.concept_tokens is None:
            raise E4TError(f"{name!r} is not a personalised concept")
        self.name, self.path, self.config = name, path, weights.config
        features = e4t.ImageFeatures(tokens=weights.concept_tokens.float())
        with torch.no_grad():
            self.folded = weights.encoder.float().fold(features).eval()
            self.deltas = {k: d.float() for k, d in weights.offsets.float().deltas().items()}
        self.unet_delta = weights.unet_delta
        self.unet_dim = weights.encoder.cfg.unet_dim
        self.word_dim = weights.encoder.cfg.word_dim

    @property
    def placeholder(self):
        return self.config.placeholder


_concepts = {}


def concept(name: str) -> Concept:
    path = store.path_of(name, store.CONCEPT)
    key = (path, store.mtime(path))
    if key not in _concepts:
        _concepts.clear()                     # one concept's derived tensors in RAM at a time
        _concepts[key] = Concept(name, path)
    return _concepts[key]


def model_input(denoiser, x: torch.Tensor, sigma: torch.Tensor):
    """(U-Net input, timestep) for the sampler's x and sigma, as its denoiser would compute them."""
    from modules import sd_samplers_timesteps
    if isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps):
        return x, sigma                                      # DDIM, PLMS, UniPC: x_t and t already
    inner = denoiser.inner_model
    if hasattr(inner, "get_scalings") and hasattr(inner, "sigma_to_t"):
        c_in = inner.get_scalings(sigma)[-1]                 # eps, v and LCM denoisers: c_in is last
        return x * c_in.reshape(-1, 1, 1, 1).to(x), inner.sigma_to_t(sigma)
    raise E4TError(f"unsupported sampler: its denoiser {type(inner).__name__} has no sigma scalings")


class PassPrompts:
    """The positive prompts of one sampler run, split and scheduled exactly as the webui does it
    (`prompt_parser.get_multicond_learned_conditioning`), so that rows line up with `text_cond`."""

    def __init__(self, prompts, steps, hires_steps, width, height, placeholder):
        from modules import prompt_parser, shared
        self.sd_prompts = prompt_parser.SdConditioning(prompts, width=width, height=height)
        res_indexes, flat, _ = prompt_parser.get_multicond_prompt_list(self.sd_prompts)
        self.schedules = prompt_parser.get_learned_conditioning_prompt_schedules(
            flat, steps, hires_steps, shared.opts.use_old_scheduling)
        self.rows = [(image, index) for image, indexes in enumerate(res_indexes) for index, _ in indexes]
        self.images = len(prompts)
        self.refined = {i for i, schedule in enumerate(self.schedules)
                        if any(placeholder in text for _, text in schedule)}
        self.users = {i: sorted({image for image, index in self.rows if index == i}) for i in self.refined}

    def schedule_index(self, index: int, step: int) -> int:
        for current, (end_at_step, _) in enumerate(self.schedules[index]):
            if step <= end_at_step:
                return current
        return 0


class NormRun:
    """(timestep, ‖w − e_domain‖ mean over the batch) of every denoiser call of one sampler run."""

    def __init__(self, iteration: int, hires: bool):
        self.iteration, self.hires, self._t, self._norm = iteration, hires, [], []

    def add(self, t: torch.Tensor, words: torch.Tensor, e_domain: torch.Tensor):
        # kept as device tensors: no GPU sync per step; read once after the job
        self._t.append(t.flatten()[0].float())
        self._norm.append((words.float() - e_domain.to(words.device, torch.float32)).norm(dim=-1).mean())

    def __len__(self):
        return len(self._t)

    def points(self):
        """[(t, norm)] as floats, in call order."""
        return [(float(t), float(n)) for t, n in zip(self._t, self._norm)]


class _Guard:
    """A pre-hook on the U-Net that raises a stored error, so a failed E4T setup fails the job."""

    def __init__(self, unet, p):
        self.error, self.handle, self.p = None, None, p
        self.handle = unet.register_forward_pre_hook(self._check)

    def _check(self, module, args):
        if self.error is not None:
            error, self.error = self.error, None
            RUNTIME.stop(self.p)
            raise error

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Session:
    def __init__(self, p, concept_name: str, strength: float, t_stop: float):
        from modules import devices, shared
        sd_model = shared.sd_model
        host.check_model(sd_model)
        if getattr(p, "refiner_checkpoint_info", None) is not None:
            raise E4TError("E4T cannot follow a refiner checkpoint switch; turn the refiner off")
        if getattr(p, "enable_hr", False) and getattr(p, "hr_checkpoint_name", None) not in (None, "", "Use same checkpoint"):
            raise E4TError("E4T cannot follow a hires-fix checkpoint switch; use the same checkpoint for hires fix")
        self.p, self.sd_model, self.unet = p, sd_model, host.unet(sd_model)
        self.concept = c = concept(concept_name)
        try:
            self.strength = e4t.validate.number("E4T strength", strength, 0, 2)
            self.t_stop = float(e4t.validate.number("E4T t_stop", t_stop, 0, 1000))
        except e4t.validate.InputError as err:
            raise E4TError(str(err)) from None
        self.placeholder_text = c.placeholder
        self._check_fit()
        self.device = devices.device
        self.hooks, self.placeholder, self.pass_prompts, self.calls = None, None, None, 0
        self._handed, self._unshared = None, None            # the `SharedRows` handed to the webui's next call
        self._cache, self._slots = {}, {}
        self.runs = []                         # a NormRun per sampler run (n_iter batches, hires passes)
        try:
            e_domain = host.input_embedding(sd_model, host.single_token(sd_model, c.config.domain_word))
            self.e_domain = e_domain = e_domain.to(self.device)
            # the empty context is encoded in begin_pass, after this job's extra networks are active
            self.refinement = self._core = e4t.Refinement(c.folded.to(self.device), e_domain, None, c.config.scale,
                                                          self.t_stop)
            storage = torch.device("cpu") if host.low_vram(sd_model) else self.device
            self.hooks = WeightHooks(self.unet, c.deltas, c.unet_delta, self.strength, storage=storage).apply()
            self.placeholder = host.Placeholder(sd_model, c.placeholder, e_domain, filename=c.path)
            host.clear_cond_caches(p)
        except BaseException:
            self.close()
            raise

    def _check_fit(self):
        c = self.concept
        changed = {k: tuple(d.shape) for k, d in list(c.deltas.items()) + list(c.unet_delta.items())}
        host.check_fits(f"concept {c.name!r}", c.word_dim, c.unet_dim, changed, self.sd_model)

    def infotext(self) -> dict:
        c = self.concept
        return {"E4T": c.name, "E4T hash": store.file_hash(c.path, c.name)[:10],
                "E4T strength": self.strength, "E4T t_stop": int(self.t_stop)}

    def begin_pass(self, p):
        """Prompts, steps and size of the sampler run about to start, as the webui computed its conds."""
        from modules import sd_samplers
        if getattr(p, "is_hr_pass", False):
            config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
            steps = p.hr_second_pass_steps or p.steps
            hires = config.total_steps(steps) if config else steps
            args = (p.hr_prompts, p.firstpass_steps, hires, p.hr_upscale_to_x, p.hr_upscale_to_y)
        else:
            args = (p.prompts, p.firstpass_steps, None, p.width, p.height)
        self.pass_prompts = PassPrompts(*args, self.placeholder_text)
        self.runs.append(NormRun(int(getattr(p, "iteration", 0) or 0), bool(getattr(p, "is_hr_pass", False))))
        self._core.empty_context = host.empty_context(self.sd_model)        # this job's LoRA on the text encoder
        self.refinement.reset()
        self._cache, self._slots = {}, {}                   # slot encoders per pass: this job's LoRA, CLIP skip
        self._unshared = None                               # why the feature pass runs on its own (said once)

    @torch.no_grad()
    def on_cfg_denoiser(self, params):
        from modules import devices
        if self._handed is not None:                        # rows the webui never called for (interrupted)
            self._handed.remove()
            self._handed = None
        prompts = self.pass_prompts
        cond = params.text_cond
        if not isinstance(cond, torch.Tensor) or cond.shape[0] != len(prompts.rows) or \
                params.text_uncond.shape[0] != prompts.images:
            raise E4TError(f"unexpected conditioning layout ({tuple(getattr(cond, 'shape', ()))} for "
                           f"{len(prompts.rows)} prompt rows): another extension may have changed it")
        if not prompts.refined:                             # no placeholder in this pass: weights only
            return
        n = prompts.images
        x, t = model_input(params.denoiser, params.x[-n:], params.sigma[-n:])
        t = t.to(devices.dtype_unet).float()                # the precision the U-Net call gets
        shares = self._shares(params, t)
        with devices.autocast():
            host.unet_on_device(self.sd_model)
            maps = e4t.unet_features(self.unet, x, t, self._core.empty_context, devices.dtype_unet) if shares else None
            words = self.refinement(self.unet, x, t, devices.dtype_unet, maps=maps)       # (n, d)
        self.calls += 1
        self.runs[-1].add(t, words, self.e_domain)        # also when frozen below t_stop: one point per call
        if words is not self._cache.get("words"):
            self._cache = {"words": words}
        step = params.denoiser.step
        encoded = {i: self._encoded(i, prompts.schedule_index(i, step), words) for i in prompts.refined}
        new = cond.clone()
        for row, (image, index) in enumerate(prompts.rows):
            if index in encoded:
                enc = encoded[index][prompts.users[index].index(image)]
                new[row] = _fit_tokens(enc, cond.shape[1]).to(cond)
        params.text_cond = new
        if maps is not None:
            self._handed = shared_pass.SharedRows(params, self.unet, len(prompts.rows), maps)
            self._handed.hand_over()

    def _shares(self, params, t) -> bool:
        """Whether the feature pass's maps stand in for the unconditional rows' down/mid blocks in the webui's
        call that follows (`shared_pass`); where that does not apply it says why, once per sampler run. False
        too where w is not predicted at this step (below t_stop)."""
        if not shared_pass.enabled():
            return False
        reason = shared_pass.unsupported(params, len(self.pass_prompts.rows), self._core.empty_context)
        if reason is None:
            return self._core.due(t, self.pass_prompts.images)
        if self._unshared is None:
            self._unshared = reason
            log.info("E4T: the negative prompt's U-Net pass runs whole beside the refinement's feature pass (%s)",
                     reason)
        return False

    def _encoded(self, index, entry, words):
        """(images using flat prompt `index`, tokens, d): schedule entry `entry` of that prompt with each image's
        w (cached while w is unchanged, i.e. below t_stop)."""
        from modules import devices
        key = (index, entry)
        if key not in self._cache:
            images = self.pass_prompts.users[index]
            slot = self._slot_schedule(index)
            if slot is None:
                self._cache[key] = torch.stack([self._webui_encoded(image, index, words)[entry] for image in images])
            else:
                host.text_on_device(self.sd_model)
                with devices.autocast():
                    self._cache[key] = slot(devices.cond_cast_unet(words[images]), entry)
        return self._cache[key]

    def _slot_schedule(self, index):
        """The `SlotSchedule` of flat prompt `index` in this pass, made on first use; None: the webui encodes."""
        if index not in self._slots:
            reason = slot_text_unsupported(self.sd_model)
            if reason is None:
                from modules import devices
                self.placeholder.ensure()                       # tokenising needs it registered
                host.text_on_device(self.sd_model)              # its encoders live where the CLIP runs
                with devices.autocast():
                    texts = [text for _, text in self.pass_prompts.schedules[index]]
                    self._slots[index] = SlotSchedule(self.sd_model, texts, self.placeholder.embedding)
            else:
                log.info("E4T: prompts are re-encoded through the webui's whole prompt path (%s)", reason)
                self._slots[index] = None
        return self._slots[index]

    def _webui_encoded(self, image, index, words):
        """The conds of one flat prompt's schedule with image `image`'s w through `get_learned_conditioning`."""
        from modules import devices, prompt_parser
        key = ("webui", image, index)
        if key not in self._cache:
            texts = prompt_parser.SdConditioning([text for _, text in self.pass_prompts.schedules[index]],
                                                 copy_from=self.pass_prompts.sd_prompts)
            self.placeholder.ensure()                   # an embeddings reload may have dropped it
            self.placeholder.set(words[image])
            try:
                with devices.autocast():
                    self._cache[key] = self.sd_model.get_learned_conditioning(texts)
            finally:                                    # other encodes (hires, negative, cache misses) see e_domain
                self.placeholder.set(self.e_domain)
        return self._cache[key]

    def close(self):
        if self._handed is not None:
            self._handed.remove()
        if self.hooks is not None:
            self.hooks.remove()
        if self.placeholder is not None:
            self.placeholder.remove()
        host.clear_cond_caches(self.p)


_EMPHASES = ("None", "Ignore", "Original", "No norm")     # the webui's own emphasis classes, by name


def slot_text_unsupported(sd_model):
    """Why `SlotSchedule` cannot reproduce this webui's prompt encoding exactly (None: it can). It rebuilds the
    path of the stock SD1 prompt wrapper (`FrozenCLIPEmbedderWithCustomWords`) with the webui's own emphasis
    classes; anything else (another wrapper class or one an extension patched, the old emphasis implementation,
    a custom emphasis, hooks on the CLIP modules other than the webui's --medvram ones, fp8 weights, a CLIP skip
    past the first layer) is encoded through the webui's whole path. SD2/SDXL and Forge never get here
    (`host.check_model`)."""
    from modules import sd_emphasis, sd_hijack_clip, shared
    clip = sd_model.cond_stage_model
    if type(clip) is not sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords:
        return f"prompt wrapper {type(clip).__name__}"
    if any(name in vars(clip) for name in ("forward", "process_tokens", "encode_with_transformers", "tokenize_line")):
        return "the prompt wrapper is patched"
    if shared.opts.use_old_emphasis_implementation:
        return "the old emphasis implementation"
    emphasis = sd_emphasis.get_current_option(shared.opts.emphasis)
    if emphasis.__module__ != sd_emphasis.__name__ or emphasis.name not in _EMPHASES:
        return f"emphasis {emphasis.name!r}"
    if clip.id_end != clip.id_pad:
        return "padding differs from the end token"
    transformer = clip.wrapped.transformer
    tm = transformer.text_model
    if next(tm.parameters()).dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"text encoder weights in {next(tm.parameters()).dtype}"
    for module in (transformer, tm, tm.embeddings, tm.encoder, *tm.encoder.layers,
                   *(m for layer in tm.encoder.layers for m in (layer.self_attn, layer.mlp))):
        hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
        if any(getattr(h, "__name__", "") != "send_me_to_gpu" for h in hooks):
            return f"a hook on the text encoder's {type(module).__name__}"
    try:
        host.clip_layers(sd_model)
    except ValueError as err:
        return str(err)
    return None


class SlotSchedule:
    """One flat prompt's schedule encoded again per step through `e4t.SlotEncoder`, from the webui's own
    chunks, equal to its `get_learned_conditioning` of the schedule's texts with w as the placeholder's
    vector to float rounding (another attention kernel: ~1e-7 relative).

    The webui encodes the schedule's texts as one batch, chunk by chunk (75 tokens, BREAK), shorter texts
    padded with empty chunks (`TextConditionalModel.forward`); its emphasis scales each chunk by the
    multipliers and ("Original") restores the mean over that whole batch. So per chunk index: a SlotEncoder
    per schedule entry (`tokenize_line` gives tokens, multipliers and textual-inversion fixes; the
    placeholder's fixes are the slots, other embeddings' vectors go in as the webui puts them), chunks
    without the placeholder encoded once here. A call encodes the current entry only, for all words at once;
    every entry of a chunk whose multipliers are not all 1, where the emphasis mixes them (the webui's own
    emphasis object on the assembled z). CLIP skip: `CLIP_stop_at_last_layers`, final layer norm always.
    """

    def __init__(self, sd_model, texts, placeholder):
        from modules import sd_emphasis, shared
        clip = sd_model.cond_stage_model
        tm = clip.wrapped.transformer.text_model
        self.emphasis = sd_emphasis.get_current_option(shared.opts.emphasis)
        mixes = self.emphasis.after_transformers is not sd_emphasis.Emphasis.after_transformers
        n_layers, device = host.clip_layers(sd_model), tm.embeddings.position_embedding.weight.device
        dtype = e4t.fast_dtype(device, next(tm.parameters()).dtype)
        batch_chunks, _ = clip.process_texts(texts)
        made, self.chunks = {}, []
        for i in range(max(len(chunks) for chunks in batch_chunks)):
            entries = [chunks[i] if i < len(chunks) else clip.empty_chunk() for chunks in batch_chunks]
            encoders = []
            for chunk in entries:
                key = (tuple(chunk.tokens), tuple((offset, id(emb)) for offset, emb in chunk.fixes))
                if key not in made:
                    made[key] = self._encoder(tm, chunk, placeholder, n_layers, dtype, device)
                encoders.append(made[key])
            weighted = mixes and any(m != 1.0 for chunk in entries for m in chunk.multipliers)
            self.chunks.append((encoders, [chunk.tokens for chunk in entries],
                                [chunk.multipliers for chunk in entries] if weighted else None))

    @staticmethod
    def _encoder(tm, chunk, placeholder, n_layers, dtype, device):
        from modules import devices
        n, slots, vectors = len(chunk.tokens), [], {}
        for offset, embedding in chunk.fixes:                     # as sd_hijack.EmbeddingsWithFixes puts them
            if embedding is placeholder:
                slots.append(offset + 1)
                continue
            vec = embedding.vec["clip_l"] if isinstance(embedding.vec, dict) else embedding.vec
            table = tm.embeddings.token_embedding
            vec = devices.cond_cast_unet(vec).to(getattr(table, "wrapped", table).weight.dtype)
            for j in range(min(n - offset - 1, vec.shape[0])):
                vectors[offset + 1 + j] = vec[j]
        return e4t.SlotEncoder(tm, e4t.input_embeddings(tm, chunk.tokens, vectors, dtype, device), slots, n_layers)

    def __call__(self, words: torch.Tensor, entry: int) -> torch.Tensor:
        """words (b, d) -> (b, 77 · chunks, d): schedule entry `entry` with each word in the placeholder's slots."""
        out = []
        for encoders, tokens, multipliers in self.chunks:
            if multipliers is None:               # the emphasis is the identity on this chunk
                z = encoders[entry](words).expand(len(words), -1, -1)
            else:
                every = torch.stack([enc(words).expand(len(words), -1, -1) for enc in encoders], dim=1)
                z = torch.stack([self._emphasised(batch, tokens, multipliers)[entry] for batch in every])
            out.append(z)
        return torch.cat(out, dim=1)

    def _emphasised(self, z, tokens, multipliers):
        emphasis = self.emphasis()
        emphasis.tokens, emphasis.multipliers, emphasis.z = tokens, torch.asarray(multipliers).to(z.device), z
        emphasis.after_transformers()
        return emphasis.z


def _fit_tokens(cond: torch.Tensor, tokens: int) -> torch.Tensor:
    """Pad with the last vector to `tokens` rows, as `prompt_parser.stack_conds` does."""
    if cond.shape[0] < tokens:
        cond = torch.vstack([cond, cond[-1:].repeat(tokens - cond.shape[0], 1)])
    if cond.shape[0] != tokens:
        raise E4TError(f"the re-encoded prompt has {cond.shape[0]} tokens, the batch {tokens}")
    return cond


class Runtime:
    """The E4T jobs in flight, keyed by their processing object `p`. The webui runs one job at a time,
    but a job may run another inside it (ADetailer's inner img2img): each job gets only its own session
    (the denoiser callback checks `params.denoiser.p`), and a nested job suspends the outer session's
    weight hooks until it is closed."""

    def __init__(self):
        self.sessions = {}                     # id(p) -> (p, Session or None, _Guard)
        self.suspended = []                    # outer sessions whose hooks a nested job took off

    @property
    def session(self):
        """The innermost active session (None when no E4T job runs)."""
        for _, session, _ in reversed(list(self.sessions.values())):
            if session is not None:
                return session
        return None

    def _entry(self, p):
        entry = self.sessions.get(id(p))
        return entry if entry is not None and entry[0] is p else None

    def before_process(self, p):
        """A job starts: a session still open for another job belongs to an outer job running this one
        (leftovers of failed jobs are closed by `p.close`): take its weight hooks off for now."""
        self.stop(p)
        for outer_p, session, _ in self.sessions.values():
            if session is not None and session.hooks is not None and session.hooks.active:
                session.hooks.remove()
                self.suspended.append((p, session))
        self._watch_close(p)

    def _watch_close(self, p):
        """`p.close()` runs even when the job failed (txt2img/img2img/API use `closing(p)`): clean up there."""
        if getattr(p, "_e4t_close_wrapped", False):
            return
        original = p.close

        def close(*args, **kwargs):
            try:
                self.stop(p)
            except Exception:
                log.exception("E4T: cleaning up after the job failed")
            return original(*args, **kwargs)
        p.close, p._e4t_close_wrapped = close, True

    def start(self, p, concept_name, strength, t_stop):
        from modules import shared
        self.stop(p)
        self._watch_close(p)
        if host.is_forge():
            raise E4TError(host.FORGE_MESSAGE)
        guard = _Guard(host.unet(shared.sd_model), p)
        self.sessions[id(p)] = (p, None, guard)
        try:
            session = Session(p, concept_name, strength, t_stop)
            self.sessions[id(p)] = (p, session, guard)
            p.extra_generation_params.update(session.infotext())
            warning = e4t.check_base(session.concept.config, host.base_fingerprint(session.unet))
            if warning:
                p.comment(f"E4T: {concept_name}: {warning}")
            prompts = list(p.all_prompts or []) + list(getattr(p, "all_hr_prompts", None) or [])
            if not any(session.placeholder_text in text for text in prompts):
                warning = (f"no prompt contains the placeholder {session.placeholder_text}; only the concept's "
                           f"U-Net weights apply")
                p.comment(f"E4T: {warning}")                        # the UI shows comments
                p.extra_generation_params["E4T warning"] = warning   # API callers get infotexts and these
                log.warning("E4T: %s", warning)
        except Exception as err:
            self.fail(p, err)

    def fail(self, p, err: Exception):
        """Undo `p`'s session and make its job's next U-Net call raise `err` (clear message in the UI)."""
        entry = self._entry(p)
        if entry is None:
            return
        _, session, guard = entry
        if session is not None:
            session.close()
            self.sessions[id(p)] = (p, None, guard)
        if not isinstance(err, E4TError):
            log.exception("E4T failed")
            err = E4TError(f"{type(err).__name__}: {err}")
        guard.error = err

    def begin_pass(self, p):
        entry = self._entry(p)
        if entry is not None and entry[1] is not None:
            try:
                entry[1].begin_pass(p)
            except Exception as err:
                self.fail(p, err)

    def on_cfg_denoiser(self, params):
        p = getattr(params.denoiser, "p", None)
        entry = self._entry(p) if p is not None else None
        if entry is None:                      # not an E4T job (e.g. a job run inside one)
            return
        session = entry[1]
        if session is not None and session.pass_prompts is not None:
            try:
                session.on_cfg_denoiser(params)
            except Exception as err:
                self.fail(p, err)

    def norm_runs(self, p=None) -> list:
        """The job's NormRuns that have points (call before `stop`)."""
        entry = self._entry(p) if p is not None else None
        session = entry[1] if entry is not None else (self.session if p is None else None)
        return [] if session is None else [run for run in session.runs if len(run)]

    def model_loaded(self, sd_model=None, *_):
        """A checkpoint loaded while E4T jobs run: their hooks sit on a U-Net no longer used, so fail them
        loudly (a guard on the new U-Net) rather than return images whose infotext claims E4T ran."""
        for p, session, guard in list(self.sessions.values()):
            if session is not None and sd_model is not None and hasattr(sd_model, "model"):
                guard.remove()
                guard = _Guard(host.unet(sd_model), p)
                self.sessions[id(p)] = (p, session, guard)
            if session is not None:
                self.fail(p, E4TError("the checkpoint changed during the job (a refiner, hires-fix checkpoint "
                                      "or another extension loaded a model); E4T cannot follow a model switch"))

    def stop(self, p):
        entry = self._entry(p)
        if entry is not None:
            del self.sessions[id(p)]
            _, session, guard = entry
            if session is not None:
                session.close()
            guard.remove()
        keep = []
        for inner_p, outer in self.suspended:          # a nested job ended: the outer session resumes
            if inner_p is p:
                if any(s is outer for _, s, _ in self.sessions.values()):
                    outer.hooks.apply()
            else:
                keep.append((inner_p, outer))
        self.suspended = keep

    def stop_all(self, *_):
        for p, _, _ in list(self.sessions.values()):
            self.stop(p)
        self.suspended = []

RUNTIME = Runtime()
