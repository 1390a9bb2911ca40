import sys

from koff.cli import main

sys.exit(main())
