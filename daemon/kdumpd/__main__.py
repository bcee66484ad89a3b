"""``python -m kdumpd``."""

import sys

from kdumpd.errors import MissingExtensionError

try:
    from kdumpd.cli import main
except MissingExtensionError as exc:  # a C extension not built: one line, not a traceback
    print(f"kdumpd: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)

sys.exit(main())
