import sys

from fabric.control.cli import main

sys.exit(main())
