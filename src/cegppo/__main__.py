import sys

from cegppo.cli import main

sys.exit(main())
