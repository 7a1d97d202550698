"""A1111 reads this before parsing the command line: the `--e4t-dir` option."""
import os


def preload(parser):
    from modules import paths_internal
    parser.add_argument("--e4t-dir", type=str, default=os.path.join(paths_internal.models_path, "e4t"),
                        help="folder of E4T weights and personalised E4T concepts (default: <models>/e4t)")
