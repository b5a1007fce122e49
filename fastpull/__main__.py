"""``python -m fastpull``."""

import sys

try:
    from fastpull.cli.commands import main
except KeyboardInterrupt:  # Ctrl-C while still importing: no traceback for that either
    sys.exit(130)

sys.exit(main())
