"""RecBole-style entry point: ``python run_recbole_diff.py --model=SASRec --dataset=ml-100k [--key=value ...]``.

With no arguments it runs the demo on ml-100k; ``python run_recbole_diff.py doctor`` checks the environment.
"""

import sys

from recbole_diff.cli import main

if __name__ == "__main__":
    sys.exit(main())
