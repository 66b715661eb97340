"""Training-throughput benchmark: `python bench/train_throughput.py [OPTIONS]` runs `peftlab bench train [OPTIONS]`.

The logic lives in `peftlab.bench` (and `peftlab.bench.workers`); see bench/README.md.
"""

import sys

from peftlab.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench", "train"]
    main()
