"""
LEELOO relay: the server LEELOO music-sharing devices meet at.
"""

__version__ = "0.1.0"
