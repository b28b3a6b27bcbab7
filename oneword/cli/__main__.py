"""``python -m oneword.cli`` is ``ti``."""

import sys

from oneword.cli import main

sys.exit(main())
