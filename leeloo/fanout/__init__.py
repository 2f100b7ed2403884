"""
The fan-out seam: how a crew's messages reach its members wherever they
are connected, and how a device id has one connection at a time.

L{IFanout} is what the core publishes through; L{local.LocalFanout} serves
one relay process.  An engine shared by several nodes (Redis pub/sub)
implements the same interface, so the core does not know which runs.
"""

from __future__ import annotations

from typing import Any, Mapping

from zope.interface import Interface


class IFanout(Interface):
    def subscribe(crew_code: str, device_id: str, listener: Any) -> bool:
        """
        C{listener} (a L{leeloo.core.crews.Membership}) hears what is
        published to C{crew_code} from now on, as C{device_id}'s connection
        in that crew; return whether it is the crew's first listener.
        """

    def unsubscribe(crew_code: str, device_id: str, listener: Any) -> bool:
        """
        C{listener} hears C{crew_code} no more; return whether it was
        subscribed (as C{device_id}'s current listener there).
        """

    def listeners(crew_code: str) -> Mapping[str, Any]:
        """
        The crew's listeners by device id: its members online.  Read only.
        """

    def elsewhere(crew_code: str) -> Mapping[str, Any]:
        """
        The crew's members online on other nodes: device id -> (node,
        name).  Read only; empty for a single node.
        """

    def changed(crew_code: str) -> None:
        """
        Crew C{crew_code} was made, gained a bot user or went, here: other
        nodes read it again.
        """

    def renamed(old: str, new: str) -> None:
        """
        Crew C{old} is called C{new} now, here: other nodes rename it too.
        """

    def key_reset(device_id: str) -> None:
        """
        The operator reset C{device_id}'s key here: other nodes forget it
        too, and close the device's connection if they hold it.
        """

    def member_removed(crew_code: str, device_id: str) -> None:
        """
        The operator took C{device_id} out of crew C{crew_code} here: the
        node where it is online there takes it out too.
        """

    def publish(crew_code: str, out: Any, sender: Any = None, seq: int = 0) -> int:
        """
        Send C{out} (an L{leeloo.core.peer.Outgoing}, encoded once) to every
        listener of C{crew_code} but the one of session C{sender}; return how
        many it went to.  A crew message (C{seq} > 0) waits behind the
        replay of a listener still catching up.
        """

    def claim(device_id: str, session: Any) -> Any:
        """
        Make C{session} the connection of C{device_id}; return the
        connection it replaces, wherever it is (C{None} if none).
        """

    def release(device_id: str, session: Any) -> bool:
        """
        C{session} is no longer C{device_id}'s connection; return whether it
        was.
        """

    def connection(device_id: str) -> Any:
        """
        C{device_id}'s connection on this node, or C{None}.
        """

    def send_to_device(device_id: str, message: Any) -> bool:
        """
        Send C{message} to C{device_id} wherever it is connected; return
        whether it is.
        """

    def stats() -> dict:
        """
        Its figures: C{devices} connected, C{crews_online} (crews with a
        listener).
        """
