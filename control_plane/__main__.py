"""`python -m control_plane`: see control_plane.app."""

import sys

from control_plane.app import main

sys.exit(main())
