"""``python -m kdumpd``."""

import sys

from kdumpd.cli import main

sys.exit(main())
