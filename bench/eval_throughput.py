"""Evaluation-speed benchmark: `python bench/eval_throughput.py [OPTIONS]` runs `peftlab bench eval [OPTIONS]`.

The logic lives in `peftlab.bench.eval_bench`; see bench/README.md.
"""

import sys

from peftlab.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench", "eval"]
    main()
