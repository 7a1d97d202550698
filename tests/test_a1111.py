"""The A1111 extension inside a real Automatic1111 v1.10 checkout: set A1111_PATH to run (skipped otherwise;
a failure under CI=true).

The webui needs its own Python and torch, so the cases run in `tests/a1111_harness.py` under the webui's
Python, headless on CPU, with tiny random models built from the webui's own classes:
    A1111_PATH     the webui tree, with its repositories/ in place (as its first start leaves it)
    A1111_PYTHON   its Python (default: $A1111_PATH/venv/bin/python, the venv webui.sh makes)
Nothing else: the harness writes all it needs (tiny checkpoint, CLIP tokenizer files, E4T weights, LoRA)
into a fresh data folder (--data-dir) per run, with the extension linked into its extensions/, and runs
offline with an empty Hugging Face cache. Only the selected tests' cases run, in the order pytest gives.
"""
import json
import os
import subprocess

import pytest


A1111 = os.environ.get("A1111_PATH")
if not A1111:
    pytest.skip("set A1111_PATH to an A1111 v1.10 checkout to run the webui tests", allow_module_level=True)
HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "a1111_harness.py")


def webui_python():
    python = os.environ.get("A1111_PYTHON") or os.path.join(A1111, "venv", "bin", "python")
    if not os.path.exists(python):
        pytest.fail(f"no Python for the webui at {python}: set A1111_PYTHON to the Python the webui runs with")
    return python


def run_harness(request, mode, data):
    if not os.path.exists(os.path.join(A1111, "repositories", "stable-diffusion-stability-ai", "ldm")):
        pytest.fail(f"{A1111} has no repositories/stable-diffusion-stability-ai: start the webui once "
                    f"(it clones its repositories) or point A1111_PATH at a complete checkout")
    cases = [item.originalname for item in request.session.items if item.module is request.module]
    cases = [c for c in dict.fromkeys(cases) if not c.startswith("test_low_vram")] if mode == "normal" else \
        ["test_extension_is_discovered", "test_low_vram_sampling_works_and_tuning_refuses"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([webui_python(), HARNESS, "--webui", os.path.abspath(A1111), "--data", str(data),
                           "--mode", mode, "--only", *cases], capture_output=True, text=True, timeout=1800,
                          env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if "E4T-RESULT " in line:                 # progress bars may share the line
            r = json.loads(line.split("E4T-RESULT ", 1)[1])
            results[r["case"]] = r
    return proc, results


def details(run, name):
    proc, results = run
    if name not in results:
        pytest.fail(f"the harness did not report {name} (exit code {proc.returncode}); output tail:\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    r = results[name]
    assert r["ok"], f"{r['error']}\n{r['traceback']}"
    return r["details"]


@pytest.fixture(scope="module")
def webui(request, tmp_path_factory):
    return run_harness(request, "normal", tmp_path_factory.mktemp("a1111-data"))


@pytest.fixture(scope="module", params=["medvram", "lowvram"])
def webui_low_vram(request, tmp_path_factory):
    return run_harness(request, request.param, tmp_path_factory.mktemp(f"a1111-{request.param}"))


def test_extension_is_discovered(webui):
    assert "e4t" in details(webui, "test_extension_is_discovered")["extensions"]


def test_conditioning_swapped_every_step_euler(webui):
    d = details(webui, "test_conditioning_swapped_every_step_euler")
    assert d["denoiser"] == "CFGDenoiserKDiffusion" and d["calls"] == 3


def test_conditioning_swapped_every_step_ddim(webui):
    d = details(webui, "test_conditioning_swapped_every_step_ddim")
    assert d["denoiser"] == "CFGDenoiserTimesteps" and d["calls"] >= 2


def test_hires_fix_second_pass_is_refined(webui):
    d = details(webui, "test_hires_fix_second_pass_is_refined")
    assert d["first"] >= 2 and d["hires"] >= 2


def test_img2img_is_refined(webui):
    details(webui, "test_img2img_is_refined")


def test_norm_plot_only_when_ticked(webui):
    d = details(webui, "test_norm_plot_only_when_ticked")
    assert len(d["points"]) == 3 and all(norm > 0 for _, norm in d["points"])


def test_reencoding_matches_webui_prompt_path(webui):
    details(webui, "test_reencoding_matches_webui_prompt_path")


def test_reencoding_matches_webui_for_long_prompts_batches_and_emphasis_options(webui):
    details(webui, "test_reencoding_matches_webui_for_long_prompts_batches_and_emphasis_options")


def test_nested_job_does_not_get_the_outer_session(webui):
    details(webui, "test_nested_job_does_not_get_the_outer_session")


def test_offsets_stack_with_lora_and_are_removed(webui):
    details(webui, "test_offsets_stack_with_lora_and_are_removed")


def test_weight_cache_gives_bit_identical_images(webui):
    details(webui, "test_weight_cache_gives_bit_identical_images")


def test_negative_pass_is_shared_with_the_feature_pass(webui):
    details(webui, "test_negative_pass_is_shared_with_the_feature_pass")


def test_failed_setup_fails_the_job_with_a_clear_message(webui):
    details(webui, "test_failed_setup_fails_the_job_with_a_clear_message")


def test_tune_inside_webui_saves_a_concept(webui):
    details(webui, "test_tune_inside_webui_saves_a_concept")


def test_tune_with_automatic_face_mask(webui):
    d = details(webui, "test_tune_with_automatic_face_mask")
    if not d["opencv"]:
        pytest.skip("OpenCV is not installed in the webui's Python: only its clear message was checked")
    if not d["astronaut"]:
        pytest.skip("scikit-image is not installed in the webui's Python: only the 'no face found' path was "
                    "checked")
    assert "no face found" in d["message"] and 0 < d["mask_fraction"] < 0.5


def test_tab_and_script_ui_build_and_infotext_restores(webui):
    details(webui, "test_tab_and_script_ui_build_and_infotext_restores")


def test_newcomer_tab_hints_and_api_warning(webui):
    details(webui, "test_newcomer_tab_hints_and_api_warning")


def test_bad_inputs_are_refused_with_what_to_do(webui):
    d = details(webui, "test_bad_inputs_are_refused_with_what_to_do")
    assert "forbidden" in d["refused pickle"] and "is empty" in d["empty concept"]


def test_low_vram_sampling_works_and_tuning_refuses(webui_low_vram):
    details(webui_low_vram, "test_extension_is_discovered")
    assert "--medvram" in details(webui_low_vram, "test_low_vram_sampling_works_and_tuning_refuses")["refusal"]
