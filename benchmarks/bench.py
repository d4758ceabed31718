"""Run the janusvl benchmark: `python benchmarks/bench.py [MODEL] [--no-images] [--json out.json]`.

Same as `janusvl bench`; see `janusvl bench --help`.
"""

import sys

from janusvl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
