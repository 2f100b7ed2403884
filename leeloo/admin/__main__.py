"""
C{python3 -m leeloo.admin}: the same as C{leeloo-admin}.
"""

import sys

from leeloo.admin.cli import main

sys.exit(main())
