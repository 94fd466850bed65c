"""`python -m dopsd` runs the command line."""

import sys

from dopsd.cli import main


sys.exit(main())
