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

# CI=true: every test must run. A skip (a host, browser or package the tests need is missing) is turned
# into a failure, so CI can never pass by testing less; tests that do not apply to a host are deselected.
CI = os.environ.get("CI") == "true"


def _ci_failure(report):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true forbids skips (install what is missing): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        _ci_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if CI and report.skipped:
        _ci_failure(report)


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy_feature(path): runs only on ComfyUI trees that have this path "
                                       "(deselected elsewhere: the test does not apply to older hosts)")


def pytest_collection_modifyitems(config, items):
    """Tests of a ComfyUI feature the tree lacks are deselected, not skipped: nothing is missing."""
    from e4t_standalone.comfy_models import comfy_root
    marked = [item for item in items if item.get_closest_marker("comfy_feature")]
    if not marked:
        return
    root = comfy_root()
    absent = [item for item in marked
              if not os.path.exists(os.path.join(root, item.get_closest_marker("comfy_feature").args[0]))]
    if absent:
        config.hook.pytest_deselected(items=absent)
        items[:] = [item for item in items if item not in absent]


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
