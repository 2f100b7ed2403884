"""
Per-address limits shared by every relay node on one Redis: the TCP
connections open from a client address (and the WebSocket connections a
trusted proxy forwards for it), and the rate of its new TCP connections.
Without this, a client spreading its connections over K nodes would get K
times each limit.

Each node first applies its own limits (L{leeloo.access}), as a single
node does; a connection they let in is then checked against the whole
cluster by one Lua script, atomic in Redis (L{ADMIT}), before a byte of it
is read (the channel stops reading until the answer).

Keys (prefix C{leeloo:}, as the store's):

  - C{limits:conns:NODE}: a hash, client address -> connections open at
    NODE.  It expires C{ttl} seconds after NODE last heartbeat, so a node
    that dies (C{kill -9}) takes its counts with it.
  - C{limits:nodes}: the set of nodes that may hold counts (the heartbeat
    drops those whose hash has expired).
  - C{limits:rate:ADDRESS}: the address's token bucket (C{t} tokens at
    Redis's time C{s}), expiring once it would be full again.

While Redis cannot be reached the node fails open to its own limits: a
connection is let in by the node's caps alone (so a cluster of K nodes
lets an address have K times the cap, as K separate relays would), and
once Redis is back the node writes its whole table again (L{RESYNC})
before anything else uses the connection.
"""

from __future__ import annotations

import math
import uuid
from hashlib import sha1
from typing import Any, Hashable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from leeloo.access import CONNECTING_TOO_FAST, TOO_MANY_FROM_ADDRESS
from leeloo.limits import Limiter, Rate

_log = Logger()

# ARGV: prefix, node, address, cap, per_second (0: no rate), burst, ttl_ms.
# Answers {"ok"}, {"rate", seconds to wait} or {"count", connections open}.
ADMIT = """
local prefix, node, address = ARGV[1], ARGV[2], ARGV[3]
local cap, per_second, burst = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if per_second > 0 then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
  local key = prefix .. 'limits:rate:' .. address
  local bucket = redis.call('HMGET', key, 't', 's')
  local tokens = burst
  if bucket[1] then
    tokens = math.min(burst, tonumber(bucket[1]) + math.max(0, now - tonumber(bucket[2])) * per_second)
  end
  local allowed = tokens >= 1
  if allowed then tokens = tokens - 1 end
  redis.call('HSET', key, 't', tostring(tokens), 's', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / per_second * 1000) + 1000)
  if not allowed then
    return {'rate', tostring((1 - tokens) / per_second)}
  end
end
local nodes = prefix .. 'limits:nodes'
local total = 0
for _, other in ipairs(redis.call('SMEMBERS', nodes)) do
  local count = redis.call('HGET', prefix .. 'limits:conns:' .. other, address)
  if count then total = total + tonumber(count) end
end
if total >= cap then
  return {'count', tostring(total)}
end
local own = prefix .. 'limits:conns:' .. node
redis.call('HINCRBY', own, address, 1)
redis.call('PEXPIRE', own, ARGV[7])
redis.call('SADD', nodes, node)
return {'ok'}
"""

# ARGV: prefix, node, address.
RELEASE = """
local own = ARGV[1] .. 'limits:conns:' .. ARGV[2]
if redis.call('HINCRBY', own, ARGV[3], -1) <= 0 then
  redis.call('HDEL', own, ARGV[3])
end
return 0
"""

# ARGV: prefix, node, ttl_ms.  Keeps the node's counts alive and forgets
# the nodes whose counts have expired.
HEARTBEAT = """
local prefix, node = ARGV[1], ARGV[2]
local nodes = prefix .. 'limits:nodes'
for _, other in ipairs(redis.call('SMEMBERS', nodes)) do
  if other ~= node and redis.call('EXISTS', prefix .. 'limits:conns:' .. other) == 0 then
    redis.call('SREM', nodes, other)
  end
end
redis.call('PEXPIRE', prefix .. 'limits:conns:' .. node, ARGV[3])
return 0
"""

# ARGV: prefix, node, ttl_ms, then address, count pairs: the node's whole
# table, written again.
RESYNC = """
local prefix, node = ARGV[1], ARGV[2]
local own = prefix .. 'limits:conns:' .. node
redis.call('DEL', own)
if #ARGV > 3 then
  redis.call('HSET', own, unpack(ARGV, 4))
  redis.call('PEXPIRE', own, ARGV[3])
  redis.call('SADD', prefix .. 'limits:nodes', node)
end
return 0
"""

# ARGV: prefix, budget name, key, per_second, burst.  Spend one token of
# the cluster's bucket for the key, going below zero (down to -burst) if
# it is empty: a node let it in on its own bucket already.  Returns the
# tokens left (a string), by Redis's clock.
SPEND = """
local key = ARGV[1] .. 'limits:budget:' .. ARGV[2] .. ':' .. ARGV[3]
local per_second, burst = tonumber(ARGV[4]), tonumber(ARGV[5])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local bucket = redis.call('HMGET', key, 't', 's')
local tokens = burst
if bucket[1] then
  tokens = math.min(burst, tonumber(bucket[1]) + math.max(0, now - tonumber(bucket[2])) * per_second)
end
tokens = math.max(-burst, tokens - 1)
redis.call('HSET', key, 't', tostring(tokens), 's', tostring(now))
redis.call('PEXPIRE', key, math.ceil((burst - tokens) / per_second * 1000) + 1000)
return tostring(tokens)
"""

_SCRIPTS = {name: (sha1(body.encode()).hexdigest(), body.encode())
            for name, body in (("ADMIT", ADMIT), ("RELEASE", RELEASE), ("HEARTBEAT", HEARTBEAT),
                               ("RESYNC", RESYNC), ("SPEND", SPEND))}


def new_node_id() -> str:
    """
    A name for this node's counts, new at every start: a node that comes
    back after a crash does not inherit the counts it held before.
    """
    return uuid.uuid4().hex[:16]


class Ticket:
    """
    One connection counted by L{SharedLimits.admit}.  C{answer} is the
    Deferred of Redis's answer while it is awaited, else C{None}.
    """

    __slots__ = ("owner", "address", "epoch", "counted", "pending", "released", "refused")

    def __init__(self, owner: SharedLimits, address: str) -> None:
        self.owner = owner
        self.address = address
        self.epoch = owner.epoch
        self.counted = False
        self.pending = False
        self.released = False
        self.refused = False

    def release(self) -> None:
        """
        The connection closed (or was refused by the node afterwards).
        """
        if self.owner is not None:
            self.owner.release(self)


class SharedLimits:
    """
    The cluster's count of connections per client address, over
    C{connection} (a L{leeloo.redisstore.RedisConnection}, shared with the
    store), for this node C{node}.

    @ivar heartbeat: seconds between the node's heartbeats; its counts
        live C{3 * heartbeat} seconds after the last one.
    @ivar alive: connections this node has let in and not yet released,
        by address (its own table, written again after an outage).
    """

    def __init__(self, connection: Any, clock: Any, node: str | None = None, heartbeat: float = 5.0) -> None:
        self.connection = connection
        self.clock = clock
        self.node = node or new_node_id()
        self.heartbeat = heartbeat
        self.prefix = connection.settings.prefix
        self.alive: dict[str, int] = {}
        self.pending = 0
        self.epoch = 0
        # The node's table in Redis may be wrong (a command failed): write
        # it again at the next heartbeat with nothing in flight.
        self.dirty = False
        self.failed_open = 0
        self._warned_open = False

    @property
    def ttl_ms(self) -> int:
        return max(1, math.ceil(3 * self.heartbeat * 1000))

    def _script(self, name: str, *args: Any, protocol: Any = None) -> Deferred:
        from leeloo.redisstore import run_script

        digest, body = _SCRIPTS[name]
        return run_script(self.connection.call, digest, body, [], [self.prefix, *args], protocol=protocol)

    def admit(self, address: str, cap: int, rate: Rate | None = None) -> tuple[Ticket, Deferred | None]:
        """
        Count a connection from C{address}, which this node's own limits
        have let in, against the cluster: at most C{cap} open from it on
        all nodes, and (with C{rate}) new ones at most at that rate.

        @return: the connection's L{Ticket}, and C{None} when it is let in
            at once (no Redis: fail open), or a Deferred firing with
            C{None} (let in) or C{(reason, seconds to wait)}, the reasons
            those of L{leeloo.access.ConnectionGate}.  It never fails.
        """
        ticket = Ticket(self, address)
        if self.connection.protocol is None and not self.connection.starting:
            self._open(ticket)
            return ticket, None
        ticket.pending = True
        self.pending += 1
        per_second, burst = (rate.per_second, rate.burst) if rate is not None else (0, 0)
        d = self._script("ADMIT", self.node, address, cap, repr(float(per_second)), repr(float(burst)),
                         self.ttl_ms)
        d.addCallbacks(self._answered, self._unanswered, callbackArgs=(ticket,), errbackArgs=(ticket,))
        return ticket, d

    def _answered(self, reply: list, ticket: Ticket) -> tuple[str, float] | None:
        ticket.pending = False
        self.pending -= 1
        verdict = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if verdict == "ok":
            ticket.counted = True
            self.alive[ticket.address] = self.alive.get(ticket.address, 0) + 1
            if ticket.released:
                self.release(ticket)
            return None
        ticket.refused = True
        if verdict == "rate":
            return CONNECTING_TOO_FAST, float(reply[1])
        return TOO_MANY_FROM_ADDRESS, 1.0

    def _unanswered(self, failure: Any, ticket: Ticket) -> None:
        ticket.pending = False
        self.pending -= 1
        self._open(ticket)
        if ticket.released:
            self.release(ticket)
        return None

    def _open(self, ticket: Ticket) -> None:
        """
        Let C{ticket} in on this node's limits alone: Redis did not answer.
        """
        ticket.epoch = self.epoch
        self.alive[ticket.address] = self.alive.get(ticket.address, 0) + 1
        self.dirty = True
        self.failed_open += 1
        if not self._warned_open:
            self._warned_open = True
            _log.warn("per-address limits: Redis does not answer; connections are let in on this node's own "
                      "limits until it does")

    def release(self, ticket: Ticket) -> None:
        """
        C{ticket}'s connection closed: uncount it, in Redis too if Redis
        holds it (counted there, or written by a resync since).
        """
        if ticket.pending:
            ticket.released = True
            return
        if ticket.refused or ticket.owner is None:
            return
        ticket.owner = None
        address = ticket.address
        count = self.alive.get(address, 0)
        if count <= 1:
            self.alive.pop(address, None)
        else:
            self.alive[address] = count - 1
        if ticket.counted or ticket.epoch < self.epoch:
            if self.connection.protocol is None:
                self.dirty = True
                return
            self._script("RELEASE", self.node, address).addErrback(self._lost_update)

    def _lost_update(self, failure: Any) -> None:
        self.dirty = True

    def resync(self, protocol: Any = None) -> Deferred:
        """
        Write this node's whole table to Redis again (on C{protocol}: a new
        connection, before it is used).  Connections let in until now,
        fail-open ones too, are then held in Redis.
        """
        self.epoch += 1
        self.dirty = False
        args: list = [self.node, self.ttl_ms]
        for address, count in self.alive.items():
            args += [address, count]
        if self._warned_open:
            self._warned_open = False
            _log.info("per-address limits: shared through Redis again ({count} let in on this node's own limits "
                      "meanwhile)", count=self.failed_open)
            self.failed_open = 0
        return self._script("RESYNC", *args, protocol=protocol).addErrback(self._lost_update)

    def beat(self) -> Deferred | None:
        """
        The heartbeat: keep this node's counts alive (and write them again
        if a command failed, once nothing is in flight).
        """
        if self.connection.protocol is None:
            return None
        if self.dirty and not self.pending:
            return self.resync()
        return self._script("HEARTBEAT", self.node, self.ttl_ms).addErrback(self._lost_update)


class SharedLimitsService(Service):
    """
    Heartbeats the node's L{SharedLimits} every C{heartbeat} seconds, and
    writes its table again on each new Redis connection.  Stopping it
    stops the heartbeat: what the node still holds expires.
    """

    name = "shared-limits"

    def __init__(self, shared: SharedLimits) -> None:
        self.shared = shared
        self._loop: LoopingCall | None = None
        connection = shared.connection
        connection.also_on_ready(self._ready)

    def _ready(self, protocol: Any) -> Deferred | None:
        if not self.running:
            return None
        return self.shared.resync(protocol)

    def startService(self) -> None:
        super().startService()
        _log.info("per-address limits shared through Redis by every node on it (this node: {node}, heartbeat "
                  "every {heartbeat:g}s; on its own limits while Redis does not answer)",
                  node=self.shared.node, heartbeat=self.shared.heartbeat)
        self._loop = LoopingCall(self._beat)
        self._loop.clock = self.shared.clock
        self._loop.start(self.shared.heartbeat, now=False)

    def _beat(self) -> None:
        d = self.shared.beat()
        if d is not None:
            d.addErrback(lambda f: _log.failure("per-address limits: heartbeat bug", f))

    def stopService(self) -> Any:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return None


class SharedBudget(Limiter):
    """
    A L{Limiter} whose buckets (a client address's crew entries, a bot
    user's joins, an address's /pair/ lookups) are the cluster's: each
    token this node spends is spent in Redis too, and when the cluster's
    bucket turns out to be empty, this node's is emptied as far.  The
    node decides at once on its own bucket, so over K nodes a key gets at
    most the budget and one token per node in flight, not K budgets.  While
    Redis does not answer, each node keeps to its own bucket (fail open).
    """

    def __init__(self, shared: SharedLimits, clock: Any, rate: Rate, name: str) -> None:
        super().__init__(clock, rate)
        self.shared = shared
        self.name = name

    def take(self, key: Hashable) -> float:
        wait = super().take(key)
        if not wait and self.shared.connection.protocol is not None:
            d = self.shared._script("SPEND", self.name, str(key), repr(float(self.rate.per_second)),
                                    repr(float(self.rate.burst)))
            d.addCallbacks(self._spent, self._unspent, callbackArgs=(key,))
        return wait

    def _spent(self, left: Any, key: Hashable) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            return
        now = self.clock.seconds()
        tokens = min(self.rate.burst, bucket.tokens + (now - bucket.stamp) * self.rate.per_second)
        # Spent on other nodes too: no more here than the cluster has.
        bucket.tokens, bucket.stamp = min(tokens, float(left)), now

    @staticmethod
    def _unspent(failure: Any) -> None:
        _log.debug("a shared budget's spend was not answered: {error}", error=failure.getErrorMessage())
