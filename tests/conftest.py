import importlib.util
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")   # tiny models: one thread is faster and steadier on small runners
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The engine is imported by path: putting the repository root on sys.path would let our `nodes/`
# package shadow ComfyUI's `nodes` module.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]   # `python -m pytest` adds it
for _name in ("e4t", "e4t_standalone"):
    _spec = importlib.util.spec_from_file_location(_name, os.path.join(ROOT, _name, "__init__.py"),
                                                   submodule_search_locations=[os.path.join(ROOT, _name)])
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# CI=true: a host, browser or tool the tests need must be there; its absence fails the run instead of
# skipping the tests that need it (CI must never pass by testing less).
CI = os.environ.get("CI") == "true"


def host_missing(reason, module=False):
    """Skips (a developer's machine without that host) or, under CI=true, fails with the reason."""
    if CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


@pytest.fixture(scope="session")
def comfy():
    from tiny_models import import_comfy
    return import_comfy()


@pytest.fixture
def model(comfy):
    from tiny_models import tiny_model
    return tiny_model()


@pytest.fixture
def unet(model):
    return model.model.diffusion_model


@pytest.fixture
def clip(comfy):
    from tiny_models import tiny_clip
    return tiny_clip()


@pytest.fixture
def vae(comfy):
    from tiny_models import tiny_vae
    return tiny_vae()


@pytest.fixture
def encoder():
    from tiny_models import tiny_encoder_config
    from e4t import Encoder
    torch.manual_seed(0)
    return Encoder(tiny_encoder_config()).eval()
