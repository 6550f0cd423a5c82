import sys

from effvit.cli import main

sys.exit(main())
