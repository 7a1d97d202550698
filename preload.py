"""A1111 reads this before parsing the command line, before any model is loaded: the `--e4t-dir` option,
and MKL's reproducible mode (see `e4t.seeding.reproducible_cpu_math`: same-seed CPU tunes repeat bit for bit)."""
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def preload(parser):
    from modules import paths_internal
    parser.add_argument("--e4t-dir", type=str, default=os.path.join(paths_internal.models_path, "e4t"),
                        help="folder of E4T weights and personalised E4T concepts (default: <models>/e4t)")
    if ROOT not in sys.path:
        sys.path.append(ROOT)          # as scripts/e4t_a1111.py does: after the webui's own folders
    from e4t.seeding import reproducible_cpu_math
    if reproducible_cpu_math() is False:
        print(f"E4T: MKL's reproducible mode is off (MKL_CBWR={os.environ['MKL_CBWR']}, or MKL ran before this "
              f"extension loaded): two CPU tunes with the same seed may differ in the last bits")
