"""Every shipped example workflow: checked against the node definitions, then run with tiny models."""
import glob
import json
import os

import pytest
from safetensors.torch import save_file

from comfy_harness import ROOT, Host
from test_comfy_patches import KEY, lora_for
from tiny_models import tiny_model

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
FRONT_END_ONLY = ("Note", "MarkdownNote")     # drawn by the front end, never part of the prompt
USER_FILES = {"ckpt_name", "image", "e4t_name", "lora_name", "concept"}   # names of the user's own files


@pytest.fixture(scope="module")
def host():
    h = Host()
    import folder_paths
    loras = os.path.join(os.path.dirname(h.models), "loras")
    os.makedirs(loras, exist_ok=True)
    save_file(lora_for(tiny_model(), KEY)[0], os.path.join(loras, "my_style.safetensors"))
    folder_paths.folder_names_and_paths["loras"] = ([loras], {".safetensors"})
    return h


def to_api(workflow, classes):
    """UI-format workflow -> API-format prompt, as the front end's graphToPrompt maps widget values."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONT_END_ONLY:
            continue
        spec = classes[node["type"]].INPUT_TYPES()
        declared = {**spec["required"], **spec.get("optional", {})}
        values, inputs = list(node["widgets_values"]), {}
        for name, (kind, *rest) in declared.items():
            opts = rest[0] if rest else {}
            if isinstance(kind, list) or kind in WIDGETS:
                assert values, f"{node['type']}: no widget value for {name}"
                value = inputs[name] = values.pop(0)
                if kind == "INT" and name in ("seed", "noise_seed"):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
                if opts.get("image_upload"):
                    values.pop(0)
                if isinstance(kind, list) and name not in USER_FILES:
                    assert value in kind, f"{node['type']}.{name}: {value!r} is not one of its options"
                if kind in ("INT", "FLOAT"):
                    assert opts.get("min", value) <= value <= opts.get("max", value), f"{node['type']}.{name}={value}"
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        for slot in node["inputs"]:
            if slot["link"] is None:
                assert slot["name"] not in spec["required"] or slot["name"] in inputs, f"{node['type']}.{slot['name']} unlinked"
                continue
            _, src, src_slot, _, _, kind = links[slot["link"]]
            assert slot["name"] in declared, f"{node['type']} has no input {slot['name']}"
            assert declared[slot["name"]][0] == kind, f"{node['type']}.{slot['name']}: link type {kind}"
            assert classes[nodes[src]["type"]].RETURN_TYPES[src_slot] == kind, f"link {slot['link']} type"
            inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def tiny(prompt):
    """Substitute tiny models and small sizes for the user's files and settings."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="TinyCheckpointLoader", inputs={"ckpt_name": "tiny"})
        elif kind == "LoadImage":
            node.update(class_type="TestImage", inputs={"image": "x"})
        elif kind == "E4TLoader":
            inputs["e4t_name"] = "tiny-face/"
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 3
        elif kind == "E4TPersonalize":
            inputs.update(steps=2, batch_size=2, resolution=64)
    return prompt


def test_there_are_the_three_documented_examples():
    names = [os.path.basename(w) for w in WORKFLOWS]
    assert len(names) >= 3 and any("lora" in n for n in names) and any("mask" in n for n in names)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_example_workflow_guides_a_newcomer(path):
    """A note says which files to pick and where E4T weights go; the front end's missing-models panel gets
    each model's folder (and SD1.5's download); a thumbnail; links run left to right without long loops."""
    with open(path) as f:
        workflow = json.load(f)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in FRONT_END_ONLY]
    assert len(notes) == 1
    for words in ("Load Checkpoint", "Load E4T", "Load Image", "models/e4t", "e4t_cli.py convert", "*s"):
        assert words in notes[0], words
    for node in workflow["nodes"]:
        models = node.get("properties", {}).get("models")
        if node["type"] in ("E4TLoader", "CheckpointLoaderSimple"):
            assert [m["name"] for m in models] == node["widgets_values"][:1]      # the front end matches by value
            assert models[0]["directory"] == ("e4t" if node["type"] == "E4TLoader" else "checkpoints")
            assert "url" not in models[0] or models[0]["url"].startswith("https://huggingface.co/")
    for _, src, _, dst, _, _ in workflow["links"]:
        (x0, y0), (x1, y1) = nodes[src]["pos"], nodes[dst]["pos"]
        assert x1 > x0, (nodes[src]["type"], nodes[dst]["type"])                    # no link loops back
        if nodes[src]["type"] == "E4TLoader":
            assert abs(x1 - x0) + abs(y1 - y0) < 600, (nodes[src]["type"], nodes[dst]["type"])
    assert os.path.exists(path[:-len(".json")] + ".jpg"), "no thumbnail (the front end shows <name>.jpg)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_example_workflow_matches_the_nodes_and_runs(host, path):
    import nodes
    with open(path) as f:
        workflow = json.load(f)
    prompt = tiny(to_api(workflow, nodes.NODE_CLASS_MAPPINGS))
    host.run(prompt)
