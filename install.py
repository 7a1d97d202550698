"""Installs the packages of requirements.txt that are missing, and nothing else.

Run by A1111 on every start (through its launcher: `launch.is_installed` / `launch.run_pip`, which
honour --skip-install and the webui's index settings) and by ComfyUI-Manager (pip with this Python).
Never installs or upgrades torch, torchvision, transformers or gradio: the host owns those.
"""
import importlib.metadata
import os
import re
import subprocess
import sys

HOST_OWNED = {"torch", "torchvision", "transformers", "gradio"}


def requirements():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("-")]


def distribution(requirement):
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def installed(name):
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def main():
    try:
        import launch
        webui = hasattr(launch, "is_installed") and hasattr(launch, "run_pip")
    except ImportError:
        webui = False
    for requirement in requirements():
        name = distribution(requirement)
        if name.lower() in HOST_OWNED:
            continue
        if webui and not launch.is_installed(name):
            launch.run_pip(f"install {requirement}", f"E4T requirement: {requirement}")
        elif not webui and not installed(name):
            subprocess.check_call([sys.executable, "-m", "pip", "install", requirement])


if __name__ == "__main__":
    main()
