"""``python -m flb.launch``: the launcher's command line (flb/launch/run.py)."""

import sys

from flb.launch.run import main

sys.exit(main())
