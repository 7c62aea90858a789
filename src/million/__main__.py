import sys

from million.cli import main

sys.exit(main())
