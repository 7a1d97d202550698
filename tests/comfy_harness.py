"""Run API-format prompts through ComfyUI's own executor with this pack loaded as a custom node.

Works on the 2024 copy (synchronous API) and on current trees (async API), chosen by feature
detection. Test-only nodes provide tiny models and capture outputs; nothing here mocks ComfyUI.
"""
import asyncio
import inspect
import os
import sys
import tempfile
import uuid

import torch

from tiny_models import import_comfy, tiny_clip, tiny_model, tiny_vae, write_published

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "ComfyUI-E4T"
CAPTURED = {}


class TinyCheckpointLoader:
    """Stands in for CheckpointLoaderSimple: the same tiny MODEL/CLIP/VAE objects every time."""
    _cache = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "tiny"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "test"

    def load(self, ckpt_name):
        if TinyCheckpointLoader._cache is None:
            TinyCheckpointLoader._cache = (tiny_model(), tiny_clip(), tiny_vae())
        return TinyCheckpointLoader._cache


class TestImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", {"default": "x"})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "make"
    CATEGORY = "test"

    def make(self, image):
        g = torch.Generator().manual_seed(7)
        img = torch.rand(1, 80, 72, 3, generator=g)
        mask = torch.zeros(1, 80, 72)
        mask[:, 10:50, 8:44] = 1                # asymmetric: a flipped or transposed mask shows
        return (img, mask)


class TestCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "key": ("STRING", {"default": "out"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"
    CATEGORY = "test"

    def capture(self, images, key):
        CAPTURED[key] = images.clone()
        return {}


class StubServer:
    def __init__(self):
        self.client_id, self.last_node_id, self.last_prompt_id, self.sockets_metadata = None, None, None, {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Host:
    """ComfyUI with the pack and test nodes loaded, plus a folder of tiny E4T weights."""

    def __init__(self):
        self.root = import_comfy()
        tmp = tempfile.mkdtemp(prefix="e4t-comfy-")
        argv = sys.argv
        sys.argv = [argv[0]]
        import nodes
        import folder_paths
        import execution
        sys.argv = argv
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        folder_paths.set_output_directory(os.path.join(tmp, "output")) if hasattr(folder_paths, "set_output_directory") else None
        self.models = os.path.join(tmp, "models_e4t")
        os.makedirs(self.models)
        folder_paths.folder_names_and_paths["e4t"] = ([self.models], {".safetensors"})
        write_published(os.path.join(self.models, "tiny-face"))
        self.custom = os.path.join(tmp, "custom_nodes")
        os.makedirs(self.custom)
        os.symlink(ROOT, os.path.join(self.custom, PACK))
        if not getattr(nodes, "_e4t_test_init", False):
            self._init_nodes()
            nodes._e4t_test_init = True
        self.server = StubServer()
        self.executor = self._executor()

    def _init_nodes(self):
        nodes = self.nodes
        if inspect.iscoroutinefunction(getattr(nodes, "init_extra_nodes", None)):
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            ok = asyncio.run(nodes.load_custom_node(os.path.join(self.custom, PACK), ignore=set(),
                                                    module_parent="custom_nodes"))
        else:
            nodes.init_custom_nodes()
            ok = nodes.load_custom_node(os.path.join(self.custom, PACK))
        assert ok, "the E4T pack failed to load"
        nodes.NODE_CLASS_MAPPINGS.update(TinyCheckpointLoader=TinyCheckpointLoader, TestImage=TestImage,
                                         TestCapture=TestCapture)

    def _executor(self):
        params = inspect.signature(self.execution.PromptExecutor.__init__).parameters
        if "cache_args" in params:
            return self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
        return self.execution.PromptExecutor(self.server)

    def validate(self, prompt):
        v = self.execution.validate_prompt
        if inspect.iscoroutinefunction(v):
            return asyncio.run(v(str(uuid.uuid4()), prompt, None))
        return v(prompt)

    def run(self, prompt, expect_success=True):
        ok, error, outputs, node_errors = self.validate(prompt)
        assert ok, (error, node_errors)
        self.server.messages.clear()
        self.executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        if expect_success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            assert self.executor.success, errors[0]["traceback"] if errors else self.executor.status_messages
        return self.executor
