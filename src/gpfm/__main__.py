import sys

from gpfm.cli import main

sys.exit(main())
