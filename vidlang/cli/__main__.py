"""``python -m vidlang.cli ...`` = ``vidlang ...``."""

import sys

from vidlang.cli import main

sys.exit(main())
