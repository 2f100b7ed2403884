"""
The fan-out of several relay nodes sharing one Redis (C{--redis}).

Each node is a process start with its own id.  It keeps its connections
as L{LocalFanout} does, and in Redis (prefix C{P}, C{leeloo:}):

  - C{P nodes}: a sorted set of the nodes alive, each scored by when its
    last heartbeat expires (Redis's clock), refreshed every
    C{--node-heartbeat} seconds for three of them;
  - C{P node:ID:online}: hash, C{CREW NUL DEVICE} -> name of its members
    online; C{P node:ID:devices}: set of its devices; C{P node:ID:n}: the
    number of its last presence batch;
  - C{P where}: hash, device id -> the node it is connected to;
  - C{P codes}: hash of the crew codes generated (reserved) so far, so two
    nodes never hand out one code (a crew's reservation goes when the crew
    is deleted).

It publishes its changes of presence, batched once per reactor turn, on
C{P presence} (every node listens; L{leeloo.fanout.mirror}), and a crew
message to the channel C{P to:ID} of each node that has members of that
crew online, as one C{PUBLISH} each; directed messages (a device's
Spotify tokens) go to the node of that device.  A node whose heartbeat
expired is reaped by the first node to beat after it (atomically, in
Lua), which announces it dead: every node then shows its members
offline to their crews.

After a reconnection the node subscribes again, reads the presence
state again, and sends its listeners what their crews' logs gained
meanwhile (gap fill from the store by seq).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, Mapping

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from leeloo import messages
from leeloo.core.peer import Outgoing
from leeloo.fanout import IFanout
from leeloo.fanout.local import LocalFanout
from leeloo.fanout.mirror import ClusterMirror, Effects
from leeloo.redisstore import RedisConnection, run_script

_log = Logger()

# KEYS: the node's online hash, P where, the node's batch counter, the
# node's devices set.  ARGV: node id, presence channel, the batch (JSON).
PRESENCE = r"""
local node = ARGV[1]
local ops = cjson.decode(ARGV[3])
for _, op in ipairs(ops) do
  local kind = op[1]
  if kind == 'J' then
    redis.call('HSET', KEYS[1], op[2] .. '\0' .. op[3], op[4])
  elseif kind == 'L' then
    redis.call('HDEL', KEYS[1], op[2] .. '\0' .. op[3])
  elseif kind == 'C' then
    redis.call('HSET', KEYS[2], op[2], node)
    redis.call('SADD', KEYS[4], op[2])
  elseif kind == 'R' then
    if redis.call('HGET', KEYS[2], op[2]) == node then redis.call('HDEL', KEYS[2], op[2]) end
    redis.call('SREM', KEYS[4], op[2])
  elseif kind == 'X' then
    redis.call('DEL', KEYS[1], KEYS[4])
  end
end
local n = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2], node .. '\0' .. n .. '\0' .. ARGV[3])
return n
"""

# A dead (or stopped) node's part goes; its death is announced as its
# batch 0.  The keys are the node's own, computed from its id.
_REAP = r"""
local P = ARGV[1]
local function reap(d)
  local where = P .. 'where'
  for _, dev in ipairs(redis.call('SMEMBERS', P .. 'node:' .. d .. ':devices')) do
    if redis.call('HGET', where, dev) == d then redis.call('HDEL', where, dev) end
  end
  redis.call('DEL', P .. 'node:' .. d .. ':online', P .. 'node:' .. d .. ':devices', P .. 'node:' .. d .. ':n')
  redis.call('PUBLISH', P .. 'presence', d .. '\0' .. '0' .. '\0' .. '[["D"]]')
end
"""

# KEYS: P nodes.  ARGV: prefix, node id, milliseconds its beat lasts.
# Returns {1 if the node was not alive (its first beat, or it had been
# reaped), the nodes reaped}.
BEAT = _REAP + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
local reaped = {}
for _, d in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)) do
  if d ~= ARGV[2] then
    redis.call('ZREM', KEYS[1], d)
    reap(d)
    reaped[#reaped + 1] = d
  end
end
return {added, reaped}
"""

# KEYS: P nodes.  ARGV: prefix, node id.
STOP = _REAP + r"""
redis.call('ZREM', KEYS[1], ARGV[2])
reap(ARGV[2])
return 1
"""

# KEYS: P nodes.  ARGV: prefix.  Every node's {id, last batch, online, devices}.
LOAD = r"""
local P = ARGV[1]
local out = {}
for _, d in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = {d, redis.call('GET', P .. 'node:' .. d .. ':n') or '0',
                   redis.call('HGETALL', P .. 'node:' .. d .. ':online'),
                   redis.call('SMEMBERS', P .. 'node:' .. d .. ':devices')}
end
return out
"""

# KEYS: P crews, P codes.  ARGV: code, node id.  1 if the code is now this
# node's to create, 0 if a crew or another node has it.
RESERVE = r"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
return redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
"""

# ARGV: channel, message, channel, message...: this turn's messages to
# other nodes, in order (channels are not keys).
PUBLISH_MANY = r"""
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""

# KEYS: P seq.  ARGV: crew codes.  Their last sequences.
LAST_SEQS = r"""
if #ARGV == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ARGV))
"""

_SCRIPTS = {name: (hashlib.sha1(body.encode()).hexdigest(), body) for name, body in
            {"PRESENCE": PRESENCE, "BEAT": BEAT, "STOP": STOP, "LOAD": LOAD, "RESERVE": RESERVE,
             "LAST_SEQS": LAST_SEQS, "PUBLISH_MANY": PUBLISH_MANY}.items()}


class _ClusterConnection(RedisConnection):
    """
    One of a node's two links to the other nodes through Redis (commands,
    and the subscription), logged as such.
    """

    CANNOT_CONNECT = "the cluster's link to Redis at {where} cannot connect: {error}; retrying"
    CONNECTED = "the cluster's link to Redis at {where} is up"
    CONNECTED_AGAIN = "the cluster's link to Redis at {where} is up again"
    NOT_READY = "the cluster's new link to Redis at {where} failed: {error}"
    LOST = "lost the cluster's link to Redis at {where}; reconnecting"


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.connection.received(channel, message)


def _framed(kind: bytes, name: str, number: int | None, payload: bytes) -> bytes:
    """
    C{KIND LEN:NAME [NUMBER:] PAYLOAD}: a name of any bytes, then the payload.
    """
    raw = name.encode()
    head = b"%s%d:%s" % (kind, len(raw), raw)
    if number is not None:
        head += b"%d:" % number
    return head + payload


def _unframed(message: bytes, numbered: bool) -> tuple[str, int, bytes]:
    colon = message.index(b":", 1)
    length = int(message[1:colon])
    name = message[colon + 1:colon + 1 + length].decode()
    rest = colon + 1 + length
    number = 0
    if numbered:
        colon = message.index(b":", rest)
        number = int(message[rest:colon])
        rest = colon + 1
    return name, number, message[rest:]


@implementer(IFanout)
class RedisFanout(LocalFanout):
    """
    This node's connections (as L{LocalFanout}) and every other node's,
    mirrored (L{ClusterMirror}), through Redis.  L{attach} gives it the
    relay (to close a device another node took, to read crews again and to
    fill gaps); L{start} and L{stop} are the fan-out service's.

    @param heartbeat: seconds between heartbeats; a node is dead three
        heartbeats after its last.
    """

    shared = True

    def __init__(self, settings: Any, reactor: Any, heartbeat: float = 5.0, node: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.node = node if node is not None else secrets.token_hex(6)
        p = self.prefix = settings.prefix
        self.k_nodes, self.k_where, self.k_seq = p + "nodes", p + "where", p + "seq"
        self.k_online = f"{p}node:{self.node}:online"
        self.k_devices = f"{p}node:{self.node}:devices"
        self.k_counter = f"{p}node:{self.node}:n"
        self.presence_channel = p + "presence"
        self._presence_bytes = self.presence_channel.encode()
        self.own_channel = self.channel(self.node)
        self.mirror = ClusterMirror(self.node)
        self.relay: Any = None
        self._ops: list[list] = []
        # This turn's messages to other nodes: channel, frame, ...
        self._outbox: list[Any] = []
        self._flush_call: Any = None
        # Redis may not hold this node's part as it is: state it whole.
        self._dirty = False
        self._beats = 0
        self._beat_failing = False
        self._loads = 0
        self.stopped = False
        self.commands = _ClusterConnection(settings, reactor, on_ready=self._commands_ready)
        self.subscriber = _ClusterConnection(settings, reactor, on_ready=self._subscribe,
                                             protocol_class=_Subscriber)
        self.subscriber.received = self._received
        self._beat = LoopingCall(self.beat)
        self._beat.clock = reactor
        # Crew code -> the last sequence this node published to it.
        self._published: dict[str, int] = {}
        # Figures.
        self.sent_remote = 0
        self.received_remote = 0
        self.reaped = 0

    def channel(self, node: str) -> str:
        return f"{self.prefix}to:{node}"

    def attach(self, relay: Any) -> None:
        self.relay = relay

    # ------------------------------------------------------------ service

    def start(self) -> None:
        self.commands.start()
        self.subscriber.start()
        self._beat.start(self.heartbeat, now=True)
        _log.info("node {node} of a cluster on Redis at {where}; heartbeat every {heartbeat:g}s",
                  node=self.node, where=self.settings.where, heartbeat=self.heartbeat)

    def stop(self) -> Deferred:
        """
        Leave the cluster: say the last changes, take this node's part out
        of Redis (the others forget it), close the connections.
        """
        self.stopped = True
        if self._beat.running:
            self._beat.stop()
        d = self._flush()
        d.addBoth(lambda _: self._script("STOP", [self.k_nodes], [self.prefix, self.node]))
        d.addErrback(lambda f: _log.warn("could not take node {node} out of Redis: {error}",
                                         node=self.node, error=f.getErrorMessage()))
        d.addBoth(lambda _: self.subscriber.stop())
        d.addBoth(lambda _: self.commands.stop())
        return d

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Deferred:
        digest, body = _SCRIPTS[name]
        return run_script(self.commands.call, digest, body, keys, args)

    def _commands_ready(self, p: Any) -> None:
        if self._beats:
            # A reconnection: what failed meanwhile is stated again.
            self._dirty = True
            self.reactor.callLater(0, self._schedule)

    # ---------------------------------------------------------- heartbeat

    def beat(self) -> Deferred:
        """
        One heartbeat: this node is alive for three more; nodes whose
        beats expired are reaped.
        """
        ttl = int(self.heartbeat * 3000)
        d = self._script("BEAT", [self.k_nodes], [self.prefix, self.node, str(ttl)])
        return d.addCallbacks(self._beaten, self._beat_failed)

    def _beaten(self, reply: list) -> None:
        added, reaped = reply
        if self._beat_failing:
            self._beat_failing = False
            _log.info("node {node} beats again", node=self.node)
        if int(added) and self._beats:
            _log.warn("node {node} was taken for dead (its heartbeat expired); announcing its devices again",
                      node=self.node)
            self._dirty = True
            self._schedule()
        self._beats += 1
        for node in reaped:
            self.reaped += 1
            _log.info("node {dead} stopped beating; its devices are offline", dead=node.decode())

    def _beat_failed(self, failure: Any) -> None:
        if not self.stopped and not self._beat_failing:
            # Said once, not every heartbeat while Redis is away.
            self._beat_failing = True
            _log.warn("node {node}'s heartbeat failed: {error}; the other nodes take it for dead after "
                      "{dead:g}s without one", node=self.node, error=failure.getErrorMessage(),
                      dead=self.heartbeat * 3)

    # ----------------------------------------------------------- presence

    def _op(self, op: list) -> None:
        self._ops.append(op)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None and not self.stopped:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _whole(self) -> list[list]:
        ops: list[list] = [["X"]]
        ops.extend(["C", device] for device in self.devices)
        for code, listeners in self._crews.items():
            ops.extend(["J", code, device, m.session.name or device] for device, m in listeners.items())
        return ops

    def _flush(self) -> Deferred:
        """
        Send this turn's changes of presence, as one batch, then its
        messages to other nodes, as one command.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        d = self._flush_presence()
        outbox, self._outbox = self._outbox, []
        if outbox:
            if len(outbox) == 2:
                sent = self.commands.call("PUBLISH", *outbox)
            else:
                sent = self._script("PUBLISH_MANY", [], outbox)
            sent.addErrback(lambda f: _log.warn("could not send {count} messages to other nodes: {error}",
                                                count=len(outbox) // 2, error=f.getErrorMessage()))
        return d

    def _flush_presence(self) -> Deferred:
        ops, self._ops = self._ops, []
        if self._dirty:
            self._dirty = False
            ops = self._whole()
        if not ops:
            return succeed(None)
        d = self._script("PRESENCE", [self.k_online, self.k_where, self.k_counter, self.k_devices],
                         [self.node, self.presence_channel, json.dumps(ops)])
        return d.addErrback(self._flush_failed)

    def _flush_failed(self, failure: Any) -> None:
        # Stated whole once Redis is back.
        self._dirty = True
        _log.warn("could not tell the cluster of this node's devices: {error}", error=failure.getErrorMessage())

    def subscribe(self, crew_code: str, device_id: str, listener: Any) -> bool:
        first = LocalFanout.subscribe(self, crew_code, device_id, listener)
        self._op(["J", crew_code, device_id, listener.session.name or device_id])
        return first

    def unsubscribe(self, crew_code: str, device_id: str, listener: Any) -> bool:
        if not LocalFanout.unsubscribe(self, crew_code, device_id, listener):
            return False
        self._op(["L", crew_code, device_id])
        return True

    def claim(self, device_id: str, session: Any) -> Any:
        previous = LocalFanout.claim(self, device_id, session)
        self._op(["C", device_id])
        return previous

    def release(self, device_id: str, session: Any) -> bool:
        if not LocalFanout.release(self, device_id, session):
            return False
        self._op(["R", device_id])
        return True

    def elsewhere(self, crew_code: str) -> Mapping[str, tuple[str, str]]:
        return self.mirror.elsewhere(crew_code)

    def changed(self, crew_code: str) -> None:
        """
        Crew C{crew_code} changed here (made, a bot user added, gone): the
        other nodes read it again once it is durable.
        """
        if self.relay is None:
            return
        self.relay.journal.barrier().addBoth(lambda _: self._op(["K", crew_code]))

    def renamed(self, old: str, new: str) -> None:
        """
        Crew C{old} is C{new} now, here: the other nodes rename it too once
        the store has.
        """
        if self.relay is None:
            return
        self.relay.journal.barrier().addBoth(lambda _: self._op(["N", old, new]))

    def key_reset(self, device_id: str) -> None:
        """
        The operator reset C{device_id}'s key here: the other nodes forget
        it once the store has, and close the device if they hold it.
        """
        if self.relay is None:
            return
        self.relay.journal.barrier().addBoth(lambda _: self._op(["Z", device_id]))

    def member_removed(self, crew_code: str, device_id: str) -> None:
        """
        The operator took C{device_id} out of crew C{crew_code} here: the
        node where it is online there takes it out too.
        """
        if self.relay is not None and device_id in self.mirror.elsewhere(crew_code):
            self.relay.journal.barrier().addBoth(lambda _: self._op(["V", crew_code, device_id]))

    def reserve(self, code: str) -> Deferred:
        """
        Fires with whether generated crew code C{code} is this node's to
        create (no crew has it, no other node generated it).
        """
        return self._script("RESERVE", [self.prefix + "crews", self.prefix + "codes"],
                            [code, self.node]).addCallback(lambda n: bool(int(n)))

    # ------------------------------------------------------------ fan-out

    def publish(self, crew_code: str, out: Outgoing, sender: Any = None, seq: int = 0) -> int:
        reached = LocalFanout.publish(self, crew_code, out, sender, seq)
        if seq:
            self._published[crew_code] = seq
        nodes = self.mirror.nodes_of.get(crew_code)
        if nodes:
            frame = _framed(b"M", crew_code, seq, out.payload)
            for node in nodes:
                self._publish(self.channel(node), frame)
            reached += len(self.mirror.crews.get(crew_code, ()))
        return reached

    def send_to_device(self, device_id: str, message: Any) -> bool:
        if LocalFanout.send_to_device(self, device_id, message):
            return True
        node = self.mirror.devices.get(device_id)
        if node is None:
            return False
        self._publish(self.channel(node), _framed(b"T", device_id, None, messages.encode(message)))
        return True

    def _publish(self, channel: str, frame: bytes) -> None:
        """
        Send C{frame} to C{channel} at the end of this turn (with the
        turn's others, in one command).
        """
        self.sent_remote += 1
        self._outbox.append(channel)
        self._outbox.append(frame)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    # ----------------------------------------------------------- receiving

    def _received(self, channel: bytes, message: bytes) -> None:
        try:
            if channel == self._presence_bytes:
                node, number, ops = message.split(b"\0", 2)
                self._effects(self.mirror.apply(node.decode(), int(number), json.loads(ops)))
            elif message[:1] == b"M":
                self.received_remote += 1
                code, seq, payload = _unframed(message, True)
                self._deliver(code, seq, payload)
            elif message[:1] == b"F":
                code, seq, _ = _unframed(message, True)
                self._fill(code, seq)
            elif message[:1] == b"T":
                device_id, _, payload = _unframed(message, False)
                self._to_device(device_id, payload)
        except Exception:
            _log.failure("bug while handling a message from the cluster on {channel}", channel=channel)

    def _deliver(self, code: str, seq: int, payload: bytes) -> None:
        """
        A crew message another node stored (C{seq}; 0 for presence): to
        this node's listeners, in order behind their catching up.
        """
        listeners = self._crews.get(code)
        if listeners is None:
            return
        out = Outgoing(None, payload)
        for membership in tuple(listeners.values()):
            if seq:
                crew = membership.crew
                if seq > crew.fanned_seq:
                    crew.fanned_seq = seq
                if membership.held is not None:
                    membership.held.append((seq, out))
                    continue
                if seq > membership.last_sent_seq:
                    membership.last_sent_seq = seq
            membership.peer.send(out)

    def _to_device(self, device_id: str, payload: bytes) -> None:
        session = self.devices.get(device_id)
        if session is not None:
            session.peer.send(Outgoing(None, payload))
            return
        # It went meanwhile: its tokens wait here for its return.
        message = json.loads(payload)
        if message.get("type") == "spotify_auth_complete" and self.relay is not None:
            self.relay.tokens.park(device_id, message["tokens"])

    def _effects(self, effects: Effects) -> None:
        relay = self.relay
        for device_id in effects.taken:
            session = self.devices.get(device_id)
            if session is not None:
                # A newer connection for this device on another node.
                del self.devices[device_id]
                self._op(["R", device_id])
                if relay is not None:
                    relay.crews_part.leave(session, announce=False)
                    relay.sessions_part.replace(session)
        for code, device_id, name in effects.gone:
            listeners = self._crews.get(code)
            if listeners and device_id not in listeners and device_id not in self.mirror.elsewhere(code):
                LocalFanout.publish(self, code, Outgoing(messages.MemberOffline(device_id, name, code)))
        for code, device_id, name in effects.back:
            listeners = self._crews.get(code)
            if listeners and device_id not in listeners:
                # Shown offline when its node was reaped; its node lives.
                LocalFanout.publish(self, code, Outgoing(messages.MemberJoined(device_id, name, code)))
        for node, code in effects.joined:
            seq = self._published.get(code)
            if seq:
                # What this node published before it knew of that member
                # did not go to its node: it fills from the store up to here.
                self._publish(self.channel(node), _framed(b"F", code, seq, b""))
        for device_id in effects.reset:
            if relay is not None:
                relay.identity.keys.pop(device_id, None)
                session = self.devices.get(device_id)
                if session is not None and not session.closing:
                    session.close(messages.CLOSE_OPERATOR, "device key reset by the relay's operator; reconnect")
        for code, device_id in effects.removed:
            membership = self._crews.get(code, {}).get(device_id)
            if membership is not None and relay is not None:
                # As the operator's node does for a member online there.
                relay.crews_part.end(membership)
                membership.session.send(messages.CrewLeft(code))
        for old, new in effects.renamed:
            if relay is not None:
                self._rename(old, new)
        for code in dict.fromkeys(effects.changed):
            if relay is not None:
                relay.store.find_crew(code).addCallbacks(
                    self._reread, lambda f: _log.warn("could not read crew {crew_code} again: {error}",
                                                      crew_code=code, error=f.getErrorMessage()),
                    callbackArgs=(code,))

    def _rename(self, old: str, new: str) -> None:
        crews = self.relay.crews_part
        crew = crews.crews.get(old)
        if crew is None or new in crews.crews:
            return
        crews.renamed_elsewhere(crew, new)
        told = messages.CrewRenamed(new, old)
        for membership in tuple(self._crews.get(new, {}).values()):
            membership.session.send(told)

    def _deleted(self, crew: Any) -> None:
        """
        Another node deleted C{crew}: its members here are told, and
        closed if they are left in no crew, as the operator's node does.
        """
        crews = self.relay.crews_part
        if crews.crews.get(crew.code) is not crew:
            return
        told = messages.CrewDeleted(crew.code)
        for membership in tuple(self._crews.get(crew.code, {}).values()):
            session = membership.session
            crews.leave_crew(membership, announce=False, save=False)
            session.send(told)
            if not session.memberships() and not session.closing:
                session.close(messages.CLOSE_OPERATOR, "crew deleted by the relay's operator; reconnect")
        crews.forget(crew, stored=True)
        _log.info("crew {crew_code} was deleted on another node", crew_code=crew.code)

    def _reread(self, snapshot: Any, code: str) -> None:
        crews = self.relay.crews_part
        crew = crews.crews.get(code)
        if snapshot is None:
            if crew is not None:
                self._deleted(crew)
            return
        if crew is None:
            crews.restore(snapshot)
            self.relay.delivery.restore(snapshot)
        else:
            crews.refresh(snapshot)

    # ---------------------------------------------------- (re)subscribing

    def _subscribe(self, p: Any) -> Deferred:
        """
        A new subscriber connection: listen, read the presence state
        (batches that come meanwhile wait), then fill what this node's
        listeners missed.
        """
        self.mirror.loading()
        d = p.subscribe([self.presence_channel, self.own_channel])
        d.addCallback(lambda _: self._script("LOAD", [self.k_nodes], [self.prefix]))
        return d.addCallback(self._loaded)

    def _loaded(self, reply: list) -> Deferred | None:
        nodes = []
        for node, number, flat, devices in reply:
            members = []
            for i in range(0, len(flat), 2):
                code, device_id = flat[i].split(b"\0", 1)
                members.append((code.decode(), device_id.decode(), flat[i + 1].decode()))
            nodes.append((node.decode(), int(number), members, [d.decode() for d in devices]))
        self._effects(self.mirror.loaded(nodes))
        self._loads += 1
        if self._loads == 1:
            _log.info("node {node} joined the cluster: {count} nodes alive", node=self.node, count=len(nodes))
        else:
            _log.info("node {node} subscribed again; filling what its devices missed", node=self.node)
            return self.fill_gaps()
        return None

    def fill_gaps(self) -> Deferred:
        """
        Send this node's listeners what their crews' logs hold past what
        they were sent (messages published while this node was not
        subscribed).
        """
        codes = list(self._crews)
        d = self._script("LAST_SEQS", [self.k_seq], codes)
        return d.addCallback(self._filled, codes)

    def _filled(self, seqs: list, codes: list[str]) -> None:
        for code, seq in zip(codes, seqs):
            if seq is not None:
                self._fill(code, int(seq))

    def _fill(self, code: str, seq: int) -> None:
        """
        Crew C{code}'s log holds up to C{seq}: this node's listeners sent
        less are sent the rest from the store (live traffic waits).
        """
        listeners = self._crews.get(code)
        if not listeners or self.relay is None:
            return
        replayer = self.relay.replayer
        for membership in tuple(listeners.values()):
            if seq > membership.crew.fanned_seq:
                membership.crew.fanned_seq = seq
            if membership.held is None and membership.last_sent_seq < seq:
                replayer.catch_up(membership)

    def stats(self) -> dict:
        figures = LocalFanout.stats(self)
        figures["remote_devices"] = len(self.mirror.devices)
        return figures
