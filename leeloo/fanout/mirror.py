"""
What one node knows of the others: who is online in which crew, on which
node, under which name, and where each device is connected.

Every node publishes its changes (batches of operations, numbered per
node) on one presence channel and keeps its own part in Redis; the
others apply them here, so that counts, names and routing are plain
reads.  L{ClusterMirror} is pure logic: it is fed the events and the
loaded state and says what follows from them (a device to close because
another node took it, members to show offline because their node died).

The operations of a batch:

  - C{["J", crew, device, name]}: the device is online in the crew;
  - C{["L", crew, device]}: it is no longer;
  - C{["C", device]}: the device is connected to the node (it replaces
    its connection anywhere else);
  - C{["R", device]}: it is no longer;
  - C{["X"]}: forget everything of the node (it states its whole part
    again in the same batch);
  - C{["K", code]}: crew C{code} changed in the store (created, a bot
    user added, deleted): read it again;
  - C{["N", old, new]}: crew C{old} was renamed C{new} (in the store too);
  - C{["Z", device]}: the operator reset the device's key (in the store too);
  - C{["V", crew, device]}: the operator took the device out of the crew.

A node found dead is announced by the node that reaped it as batch
number 0 of the dead node, C{[["D"]]}: applied whatever came before.  A
node taken for dead while it lived (its link to Redis lost for three
heartbeats) states its whole part again (C{["X"]} then its C{J}s) when it
beats again: its members, shown offline when it was reaped, are online
again (C{back}).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable, Mapping

_NONE: Mapping[str, Any] = MappingProxyType({})


class Effects:
    """
    What a batch means here: C{taken}, the devices another node took (to
    close if connected here); C{changed}, crews to read again;
    C{gone}, members (crew, device, name) of a dead node, to show offline;
    C{joined}, (node, crew) where a member came online; C{back}, members
    (crew, device, name) of a node reaped while it lived, to show online.
    """

    __slots__ = ("taken", "changed", "gone", "joined", "renamed", "reset", "removed", "back")

    def __init__(self) -> None:
        self.back: list[tuple[str, str, str]] = []
        # (crew, device): members the operator removed on another node.
        self.removed: list[tuple[str, str]] = []
        # Devices whose key the operator reset on another node.
        self.reset: list[str] = []
        # (old, new): crews another node renamed.
        self.renamed: list[tuple[str, str]] = []
        # (node, crew): a member came online there.
        self.joined: list[tuple[str, str]] = []
        self.taken: list[str] = []
        self.changed: list[str] = []
        self.gone: list[tuple[str, str, str]] = []


class ClusterMirror:
    """
    The other nodes' presence, as node C{node} sees it.

    C{crews}: crew code -> device id -> (node, name) of its members online
    on another node; C{nodes_of}: crew code -> node -> how many of them
    are there (where a crew message goes); C{devices}: device id -> the
    other node it is connected to; C{last}: node -> the number of the
    last batch applied from it.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.crews: dict[str, dict[str, tuple[str, str]]] = {}
        self.nodes_of: dict[str, dict[str, int]] = {}
        self.devices: dict[str, str] = {}
        self.last: dict[str, int] = {}
        # While the state is being loaded: the batches that came meanwhile.
        self.buffered: list[tuple[str, int, list]] | None = None
        # Nodes reaped (their members shown offline) that have not stated
        # their part again since.
        self.reaped: set[str] = set()

    def elsewhere(self, crew_code: str) -> Mapping[str, tuple[str, str]]:
        members = self.crews.get(crew_code)
        return _NONE if members is None else members

    # ------------------------------------------------------------ changes

    def _add(self, crew: str, device: str, node: str, name: str) -> None:
        members = self.crews.setdefault(crew, {})
        previous = members.get(device)
        if previous is not None:
            self._count(crew, previous[0], -1)
        members[device] = (node, name)
        self._count(crew, node, 1)

    def _remove(self, crew: str, device: str, node: str) -> tuple[str, str] | None:
        members = self.crews.get(crew)
        if members is None:
            return None
        entry = members.get(device)
        if entry is None or entry[0] != node:
            # Gone already, or online on another node since (replaced).
            return None
        del members[device]
        if not members:
            del self.crews[crew]
        self._count(crew, node, -1)
        return entry

    def _count(self, crew: str, node: str, step: int) -> None:
        counts = self.nodes_of.setdefault(crew, {})
        n = counts.get(node, 0) + step
        if n > 0:
            counts[node] = n
        else:
            counts.pop(node, None)
            if not counts:
                del self.nodes_of[crew]

    def _forget_node(self, node: str) -> list[tuple[str, str, str]]:
        """
        Drop everything of C{node}; return its members that were online
        (crew, device, name).
        """
        gone = []
        for crew, members in list(self.crews.items()):
            for device, (where, name) in list(members.items()):
                if where == node:
                    gone.append((crew, device, name))
                    self._remove(crew, device, node)
        for device in [d for d, where in self.devices.items() if where == node]:
            del self.devices[device]
        return gone

    # ------------------------------------------------------------- events

    def apply(self, node: str, number: int, ops: Iterable[list]) -> Effects:
        """
        Apply batch C{number} of C{node}'s operations (its own and those
        already loaded are skipped); return what follows.
        """
        effects = Effects()
        if self.buffered is not None:
            self.buffered.append((node, number, list(ops)))
            return effects
        if number == 0:
            # ["D"]: the node is dead.
            effects.gone = self.dead(node)
            return effects
        if node == self.node or number <= self.last.get(node, 0):
            return effects
        self.last[node] = number
        taken, changed = effects.taken, effects.changed
        revived = False
        for op in ops:
            kind = op[0]
            if kind == "J":
                self._add(op[1], op[2], node, op[3])
                effects.joined.append((node, op[1]))
                if revived:
                    effects.back.append((op[1], op[2], op[3]))
            elif kind == "L":
                self._remove(op[1], op[2], node)
            elif kind == "C":
                self.devices[op[1]] = node
                taken.append(op[1])
            elif kind == "R":
                if self.devices.get(op[1]) == node:
                    del self.devices[op[1]]
            elif kind == "X":
                self._forget_node(node)
                if node in self.reaped:
                    self.reaped.discard(node)
                    revived = True
            elif kind == "K":
                changed.append(op[1])
            elif kind == "N":
                effects.renamed.append((op[1], op[2]))
            elif kind == "Z":
                effects.reset.append(op[1])
            elif kind == "V":
                effects.removed.append((op[1], op[2]))
        return effects

    def dead(self, node: str) -> list[tuple[str, str, str]]:
        """
        C{node} died (another node reaped it): forget it; return its
        members that were online (crew, device, name), to show offline.
        """
        self.last.pop(node, None)
        if node == self.node:
            return []
        self.reaped.add(node)
        return self._forget_node(node)

    def loading(self) -> None:
        """
        The whole state is about to be read: hold the batches that come
        until L{loaded}.
        """
        if self.buffered is None:
            self.buffered = []

    def loaded(self, nodes: Iterable[tuple[str, int, Iterable[tuple[str, str, str]], Iterable[str]]]
               ) -> Effects:
        """
        The state as Redis held it: for each node, its last batch's
        number, its members online (crew, device, name) and its devices.
        Then the batches held meanwhile are applied (those the state
        already holds are skipped).  Return what L{apply} returns for them.
        """
        self.crews.clear()
        self.nodes_of.clear()
        self.devices.clear()
        self.last.clear()
        for node, number, members, devices in nodes:
            if node == self.node:
                continue
            self.last[node] = number
            for crew, device, name in members:
                self._add(crew, device, node, name)
            for device in devices:
                self.devices[device] = node
        buffered, self.buffered = self.buffered or [], None
        effects = Effects()
        for node, number, ops in buffered:
            more = self.apply(node, number, ops)
            effects.taken += more.taken
            effects.changed += more.changed
            effects.gone += more.gone
            effects.joined += more.joined
            effects.renamed += more.renamed
            effects.reset += more.reset
            effects.removed += more.removed
            effects.back += more.back
        return effects
