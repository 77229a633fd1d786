"""``python -m gpuload.bench``: the same as ``gpuload bench``."""

import sys

from .runner import main

sys.exit(main())
