import sys

from superd.cli import main

sys.exit(main())
