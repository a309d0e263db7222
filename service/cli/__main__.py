"""``python -m layertrack.service.cli``: the same as the ``layertrack`` command."""

import sys

from . import main

sys.exit(main())
