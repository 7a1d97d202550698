"""install.py (shared by A1111 and ComfyUI-Manager): only missing packages, never the host's own."""
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_install():
    spec = importlib.util.spec_from_file_location("e4t_install", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WANTED = ["torch>=2.0", "gradio", "transformers==4.30.2", "einops", "no-such-package-e4t==1.0  # comment"]


def test_reads_requirements_txt():
    install = load_install()
    assert [install.distribution(r) for r in install.requirements()] == ["open_clip_torch", "safetensors", "einops"]


def test_installs_only_what_is_missing_with_this_python(monkeypatch):
    install = load_install()
    calls = []
    monkeypatch.setattr(install, "requirements", lambda: [w.split("#")[0].strip() for w in WANTED])
    monkeypatch.setattr(install.subprocess, "check_call", calls.append)
    monkeypatch.setitem(sys.modules, "launch", None)          # not inside the webui
    install.main()
    assert calls == [[sys.executable, "-m", "pip", "install", "no-such-package-e4t==1.0"]]


def test_inside_the_webui_uses_its_launcher(monkeypatch):
    install = load_install()
    pips = []
    launch = types.SimpleNamespace(is_installed=lambda name: name == "einops",
                                   run_pip=lambda command, desc: pips.append(command))
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install, "requirements", lambda: [w.split("#")[0].strip() for w in WANTED])
    monkeypatch.setattr(install.subprocess, "check_call", lambda *a: (_ for _ in ()).throw(AssertionError("pip used")))
    install.main()
    assert pips == ["install no-such-package-e4t==1.0"]
