"""
Tests of the relay's core, one module per part of L{leeloo.core}.
"""
