import sys

from scalign.cli import main

sys.exit(main())
