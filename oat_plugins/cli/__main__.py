"""``python -m oat_plugins.cli`` (also ``torchrun ... -m oat_plugins.cli train ...``)."""

import sys

from . import main

sys.exit(main())
