"""`python -m mftcore ...`, so that `torchrun ... -m mftcore train cfg.json` works."""

import sys

from mftcore.cli import main

sys.exit(main())
