import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")   # tiny models: one thread is faster and steadier on small runners
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


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
