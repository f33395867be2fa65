import sys

from fabric.cli.main import main

sys.exit(main())
