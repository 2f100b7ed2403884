"""
The device side of LEELOO: an Autobahn client library for the Pi
(L{LeelooDevice}) and the C{leeloo-device} command.

The relay never imports this package.
"""

from leeloo.device.backoff import FullJitter
from leeloo.device.client import (
    DeviceError,
    DeviceReplaced,
    DeviceStopped,
    LeelooDevice,
    OutboxFull,
    PairingUnsupported,
    SpotifyUnsupported,
)
from leeloo.device.state import DeviceState, StateError

__all__ = [
    "DeviceError", "DeviceReplaced", "DeviceState", "DeviceStopped", "FullJitter", "LeelooDevice",
    "OutboxFull", "PairingUnsupported", "SpotifyUnsupported", "StateError",
]
