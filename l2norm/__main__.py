"""``python -m l2norm check``: the same as the ``l2norm`` console script."""

import sys

from l2norm.cli import main

sys.exit(main())
