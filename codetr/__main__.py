import sys

from codetr.cli import main

sys.exit(main())
