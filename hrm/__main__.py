import sys

from hrm.cli import main

sys.exit(main())
