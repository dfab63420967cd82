"""``python -m hdfmgr`` is the ``hdfmgr`` command."""

import sys

from .cli import main

sys.exit(main())
