"""``python -m qready ...`` (also ``torchrun ... -m qready train RECIPE``): the ``qready`` command line."""

import sys

from .app.cli import main

sys.exit(main())
