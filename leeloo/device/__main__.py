"""
C{python -m leeloo.device}: the C{leeloo-device} command.
"""

from leeloo.device.cli import main

main()
