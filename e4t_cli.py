"""`python path/to/ComfyUI-E4T/e4t_cli.py convert|personalize|pretrain|eval ...` from any folder.

The same command line as `python -m e4t ...`, which works only where the pack folder is the current
directory or on PYTHONPATH: this launcher puts its own folder on the path first.
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from e4t.__main__ import main
    sys.exit(main())
