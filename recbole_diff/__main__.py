"""``python -m recbole_diff``: the ``recbole-diff`` command."""

import sys

from recbole_diff.cli import main

sys.exit(main())
