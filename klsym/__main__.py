import sys

from klsym.cli import main

sys.exit(main())
