"""
The Lua scripts of the Redis store (L{leeloo.redisstore}).  Each runs
atomically in Redis: a batch of the journal is one C{write} script, which
checks every operation before it changes anything, so a refused batch
leaves nothing behind (Redis does not roll a script back).

The keys, under a prefix C{P} (C{leeloo:}), each crew's by its code:

  - C{P crews} hash: code -> the crew's record (JSON); C{P aliases} hash:
    old code -> the crew's code now;
  - C{P members:CODE}, C{P bots:CODE} hashes: device id / bot user id ->
    the member's record (JSON) / name;
  - C{P log:CODE} hash: seq -> payload (bytes as stored); C{P meta:CODE}
    hash: seq -> the entry's other fields (JSON); C{P seqs:CODE} sorted
    set of the log's seqs; C{P sent:CODE} hash: sender and
    client_msg_id -> seq;
  - C{P seq} hash: code -> the crew's last sequence (kept when old entries
    go, dropped with the crew); C{P bytes} hash: code -> its log's payload
    bytes; C{P times} sorted set: CODE NUL seq scored by its time (for
    pruning);
  - C{P devices}, C{P tokens}, C{P multicrew}, C{P pairings}, C{P grants}
    hashes: by device id / user code -> the record (JSON; tokens and
    grants as stored, ciphertext opaque to the engine).

Several crews per device are member rows of each crew plus the device's
C{multicrew} record, as in SQLite; nothing here assumes one crew.
"""

# Helpers shared by the scripts.
_COMMON = r"""
local P = ARGV[1]
local function sentfield(sender, cmid)
  return #sender .. ':' .. sender .. cmid
end
-- Delete log entry SEQ of crew CODE with its index rows; return its bytes.
local function drop_entry(code, seq)
  local meta = redis.call('HGET', P .. 'meta:' .. code, seq)
  local size = redis.call('HSTRLEN', P .. 'log:' .. code, seq)
  if meta then
    local m = cjson.decode(meta)
    if m.cmid ~= cjson.null and m.cmid ~= nil then
      local field = sentfield(m.sender, m.cmid)
      if redis.call('HGET', P .. 'sent:' .. code, field) == seq then
        redis.call('HDEL', P .. 'sent:' .. code, field)
      end
    end
  end
  redis.call('HDEL', P .. 'log:' .. code, seq)
  redis.call('HDEL', P .. 'meta:' .. code, seq)
  redis.call('ZREM', P .. 'seqs:' .. code, seq)
  redis.call('ZREM', P .. 'times', code .. '\0' .. seq)
  if size > 0 then
    redis.call('HINCRBY', P .. 'bytes', code, -size)
  end
  return size
end
local function newest(code)
  local top = redis.call('ZREVRANGE', P .. 'seqs:' .. code, 0, 0)
  return top[1]
end
"""

# ARGV: prefix, then each operation: its kind and its fields (see
# leeloo.redisstore._encode).  Returns the numbers minted for the batch's
# 'mint' entries, in order (for a resend already in the log, its {seq,
# meta}: see append), or an error reply starting LEELOO-REFUSED (for good)
# or LEELOO-TAKEN (a sequence already taken).
WRITE = _COMMON + r"""
local ops = {}
local i = 2
local arity = {crew=2, delete_crew=1, member=3, delete_member=2, bot_user=3, token=2, delete_token=1,
               append=6, mint=6, device=2, delete_device=1, multi_crew=2, delete_multi_crew=1, rename_crew=2, alias=2,
               grant=2, delete_grant=1}
while i <= #ARGV do
  local kind = ARGV[i]
  local n = arity[kind]
  if not n then return redis.error_reply('LEELOO-REFUSED unknown store operation ' .. kind) end
  local op = {kind}
  for j = 1, n do op[j + 1] = ARGV[i + j] end
  ops[#ops + 1] = op
  i = i + n + 1
end

-- Check: every operation against the state as the ones before it left it.
local exists = {}
local fresh = {}   -- crews deleted (or renamed away) in this batch: nothing of theirs in Redis counts
local source = {}  -- crews renamed in this batch: the code their log is still under in Redis
local taken = {}
local function crew_exists(code)
  if exists[code] == nil then exists[code] = redis.call('HEXISTS', P .. 'crews', code) == 1 end
  return exists[code]
end
local function seq_taken(code, seq)
  taken[code] = taken[code] or {}
  if taken[code][seq] ~= nil then return taken[code][seq] end
  if fresh[code] then return false end
  return redis.call('HEXISTS', P .. 'log:' .. (source[code] or code), seq) == 1
end
for _, op in ipairs(ops) do
  local kind = op[1]
  if kind == 'crew' then
    if not crew_exists(op[2]) then exists[op[2]] = true end
  elseif kind == 'delete_crew' then
    exists[op[2]] = false
    fresh[op[2]] = true
    taken[op[2]] = {}
  elseif kind == 'member' or kind == 'bot_user' or kind == 'alias' then
    local code = kind == 'alias' and op[3] or op[2]
    if not crew_exists(code) then return redis.error_reply('LEELOO-REFUSED no crew ' .. code) end
  elseif kind == 'mint' then
    if not crew_exists(op[2]) then return redis.error_reply('LEELOO-REFUSED no crew ' .. op[2]) end
  elseif kind == 'append' then
    if not crew_exists(op[2]) then return redis.error_reply('LEELOO-REFUSED no crew ' .. op[2]) end
    if seq_taken(op[2], op[3]) then
      return redis.error_reply('LEELOO-TAKEN crew ' .. op[2] .. "'s log already holds sequence " .. op[3])
    end
    taken[op[2]][op[3]] = true
  elseif kind == 'rename_crew' then
    local old, new = op[2], op[3]
    if not crew_exists(old) then return redis.error_reply('LEELOO-REFUSED no crew ' .. old) end
    if crew_exists(new) then return redis.error_reply('LEELOO-REFUSED crew ' .. new .. ' exists already') end
    exists[new] = true
    exists[old] = false
    taken[new] = taken[old] or {}
    taken[old] = {}
    fresh[new] = fresh[old]
    source[new] = source[old] or old
    fresh[old] = true
  end
end

-- Apply.
local function delete_crew(code)
  for _, seq in ipairs(redis.call('ZRANGE', P .. 'seqs:' .. code, 0, -1)) do
    redis.call('ZREM', P .. 'times', code .. '\0' .. seq)
  end
  redis.call('DEL', P .. 'members:' .. code, P .. 'bots:' .. code, P .. 'log:' .. code, P .. 'meta:' .. code,
             P .. 'seqs:' .. code, P .. 'sent:' .. code)
  redis.call('HDEL', P .. 'crews', code)
  redis.call('HDEL', P .. 'seq', code)
  redis.call('HDEL', P .. 'bytes', code)
  -- A generated code's reservation (leeloo.fanout.redis RESERVE) goes with
  -- its crew.
  redis.call('HDEL', P .. 'codes', code)
  local aliases = redis.call('HGETALL', P .. 'aliases')
  for j = 1, #aliases, 2 do
    if aliases[j + 1] == code then redis.call('HDEL', P .. 'aliases', aliases[j]) end
  end
end
local function rename(old, new)
  redis.call('HSET', P .. 'crews', new, redis.call('HGET', P .. 'crews', old))
  redis.call('HDEL', P .. 'crews', old)
  for _, part in ipairs({'members:', 'bots:', 'log:', 'meta:', 'seqs:', 'sent:'}) do
    if redis.call('EXISTS', P .. part .. old) == 1 then
      redis.call('RENAME', P .. part .. old, P .. part .. new)
    end
  end
  for _, field in ipairs({'seq', 'bytes'}) do
    local value = redis.call('HGET', P .. field, old)
    if value then
      redis.call('HSET', P .. field, new, value)
      redis.call('HDEL', P .. field, old)
    end
  end
  for _, seq in ipairs(redis.call('ZRANGE', P .. 'seqs:' .. new, 0, -1)) do
    local score = redis.call('ZSCORE', P .. 'times', old .. '\0' .. seq)
    if score then
      redis.call('ZREM', P .. 'times', old .. '\0' .. seq)
      redis.call('ZADD', P .. 'times', score, new .. '\0' .. seq)
    end
  end
  local aliases = redis.call('HGETALL', P .. 'aliases')
  for j = 1, #aliases, 2 do
    if aliases[j + 1] == old then redis.call('HSET', P .. 'aliases', aliases[j], new) end
  end
  redis.call('HDEL', P .. 'aliases', new)
  redis.call('HSET', P .. 'aliases', old, new)
end
local minted = {}
-- append: code, seq, meta, payload, time, ''; mint: code, the seq the
-- relay proposed, meta, the payload before its seq's digits, time, the
-- payload after them: the number is the crew's next here.  A mint whose
-- sender and client_msg_id the crew's log holds already (a resend through
-- another node, racing the first) is not stored again: its answer is the
-- first one's {seq, meta}.
local function append(kind, op)
  local code, seq = op[2], op[3]
  local m = cjson.decode(op[4])
  local field = nil
  if m.cmid ~= cjson.null and m.cmid ~= nil then field = sentfield(m.sender, m.cmid) end
  if kind == 'mint' then
    if field then
      local first = redis.call('HGET', P .. 'sent:' .. code, field)
      local meta = first and redis.call('HGET', P .. 'meta:' .. code, first)
      if meta then
        minted[#minted + 1] = {first, meta}
        return
      end
    end
    seq = tostring(redis.call('HINCRBY', P .. 'seq', code, 1))
    op[5] = op[5] .. seq .. op[7]
    minted[#minted + 1] = tonumber(seq)
  end
  redis.call('HSET', P .. 'log:' .. code, seq, op[5])
  redis.call('HSET', P .. 'meta:' .. code, seq, op[4])
  redis.call('ZADD', P .. 'seqs:' .. code, seq, seq)
  redis.call('ZADD', P .. 'times', op[6], code .. '\0' .. seq)
  redis.call('HINCRBY', P .. 'bytes', code, #op[5])
  if field then
    redis.call('HSET', P .. 'sent:' .. code, field, seq)
  end
  local last = tonumber(redis.call('HGET', P .. 'seq', code) or '0')
  if tonumber(seq) > last then redis.call('HSET', P .. 'seq', code, seq) end
end
local hashes = {device='devices', token='tokens', multi_crew='multicrew', grant='grants'}
local deletes = {delete_device='devices', delete_token='tokens', delete_multi_crew='multicrew',
                 delete_grant='grants'}
for _, op in ipairs(ops) do
  local kind = op[1]
  if kind == 'crew' then
    redis.call('HSET', P .. 'crews', op[2], op[3])
  elseif kind == 'delete_crew' then
    delete_crew(op[2])
  elseif kind == 'member' then
    redis.call('HSET', P .. 'members:' .. op[2], op[3], op[4])
  elseif kind == 'delete_member' then
    redis.call('HDEL', P .. 'members:' .. op[2], op[3])
  elseif kind == 'bot_user' then
    redis.call('HSET', P .. 'bots:' .. op[2], op[3], op[4])
  elseif hashes[kind] then
    redis.call('HSET', P .. hashes[kind], op[2], op[3])
  elseif deletes[kind] then
    redis.call('HDEL', P .. deletes[kind], op[2])
  elseif kind == 'append' or kind == 'mint' then
    append(kind, op)
  elseif kind == 'rename_crew' then
    rename(op[2], op[3])
  elseif kind == 'alias' then
    redis.call('HSET', P .. 'aliases', op[2], op[3])
  end
end
return minted
"""

# ARGV: prefix, code ('' for every crew).  Returns the state as load()
# reads it: {crews, aliases, devices, tokens, multicrew, pairings, per crew
# {code, members, bots, last seq, bytes, newest entry's meta, sent metas}},
# hashes as flat field/value lists.  For the old code of a renamed crew, the
# crew under its code now, and that alias.
SNAPSHOT = _COMMON + r"""
local only = ARGV[2]
local out = {}
local codes
if only == '' then
  out[1] = redis.call('HGETALL', P .. 'crews')
  out[2] = redis.call('HGETALL', P .. 'aliases')
  out[3] = redis.call('HGETALL', P .. 'devices')
  out[4] = redis.call('HGETALL', P .. 'tokens')
  out[5] = redis.call('HGETALL', P .. 'multicrew')
  out[6] = redis.call('HGETALL', P .. 'pairings')
  codes = redis.call('HKEYS', P .. 'crews')
  out[8] = redis.call('HGETALL', P .. 'grants')
else
  local record = redis.call('HGET', P .. 'crews', only)
  out[2], out[3], out[4], out[5], out[6], out[8] = {}, {}, {}, {}, {}, {}
  if not record then
    -- The old code of a renamed crew: the crew under its code now, and
    -- the alias.
    local target = redis.call('HGET', P .. 'aliases', only)
    record = target and redis.call('HGET', P .. 'crews', target)
    if not record then return {} end
    out[2] = {only, target}
    only = target
  end
  out[1] = {only, record}
  codes = {only}
end
local crews = {}
for _, code in ipairs(codes) do
  local last = redis.call('HGET', P .. 'seq', code) or ''
  local size = redis.call('HGET', P .. 'bytes', code) or '0'
  local top = newest(code)
  local newest_meta = ''
  if top then newest_meta = redis.call('HGET', P .. 'meta:' .. code, top) end
  local sent = redis.call('HVALS', P .. 'sent:' .. code)
  local metas = {}
  if #sent > 0 then
    local values = redis.call('HMGET', P .. 'meta:' .. code, unpack(sent))
    for j, meta in ipairs(values) do
      if meta then metas[#metas + 1] = sent[j]; metas[#metas + 1] = meta end
    end
  end
  crews[#crews + 1] = {code, redis.call('HGETALL', P .. 'members:' .. code),
                       redis.call('HGETALL', P .. 'bots:' .. code), last, size, newest_meta, metas}
end
out[7] = crews
return {out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]}
"""

# ARGV: prefix, code, sender, client_msg_id.  Returns {seq, meta} or {}.
FIND_SENT = _COMMON + r"""
local code = ARGV[2]
local seq = redis.call('HGET', P .. 'sent:' .. code, sentfield(ARGV[3], ARGV[4]))
if not seq then return {} end
local meta = redis.call('HGET', P .. 'meta:' .. code, seq)
if not meta then return {} end
return {seq, meta}
"""

# ARGV: prefix, code, after_seq, up_to_seq, since, exclude_sender, limit,
# ephemeral_since.  Returns the newest limit + 1 eligible entries, newest
# first, as a flat seq/payload list.
REPLAY = _COMMON + r"""
local code, after, upto, since = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local exclude, limit, eph_since = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local seqs = redis.call('ZREVRANGEBYSCORE', P .. 'seqs:' .. code, upto, '(' .. after)
local out = {}
local found = 0
for _, seq in ipairs(seqs) do
  if found > limit then break end
  local m = cjson.decode(redis.call('HGET', P .. 'meta:' .. code, seq))
  if m.at >= since and m.sender ~= exclude and (not m.eph or m.at >= eph_since) then
    out[#out + 1] = seq
    out[#out + 1] = redis.call('HGET', P .. 'log:' .. code, seq)
    found = found + 1
  end
end
return out
"""

# ARGV: prefix, code, max_bytes, keep.  Returns {first kept seq, bytes left}.
TRIM = _COMMON + r"""
local code, max_bytes, keep = ARGV[2], tonumber(ARGV[3]), math.max(1, tonumber(ARGV[4]))
local seqs = redis.call('ZREVRANGE', P .. 'seqs:' .. code, 0, -1)
local total = 0
local cut = #seqs + 1
for j, seq in ipairs(seqs) do
  local size = redis.call('HSTRLEN', P .. 'log:' .. code, seq)
  if total + size > max_bytes and j > keep then
    cut = j
    break
  end
  total = total + size
end
for j = cut, #seqs do drop_entry(code, seqs[j]) end
local first = 0
if cut > 1 then first = tonumber(seqs[cut - 1]) end
return {first, total}
"""

# ARGV: prefix, cut-off time.  Deletes the entries created before it but
# each crew's newest; returns how many.
PRUNE = _COMMON + r"""
local old = redis.call('ZRANGEBYSCORE', P .. 'times', '-inf', '(' .. ARGV[2])
local deleted = 0
local newest_of = {}
for _, member in ipairs(old) do
  local sep = string.find(member, '\0', 1, true)
  local code, seq = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  if newest_of[code] == nil then newest_of[code] = newest(code) or '' end
  if seq ~= newest_of[code] then
    drop_entry(code, seq)
    deleted = deleted + 1
  end
end
return deleted
"""

# ARGV: prefix, now.  Deletes the pairing flows expired at or before now.
PAIRINGS_EXPIRED = _COMMON + r"""
local now = tonumber(ARGV[2])
local flows = redis.call('HGETALL', P .. 'pairings')
local deleted = 0
for j = 1, #flows, 2 do
  if cjson.decode(flows[j + 1]).expires_at <= now then
    redis.call('HDEL', P .. 'pairings', flows[j])
    deleted = deleted + 1
  end
end
return deleted
"""

# ARGV: prefix.  Whether the prefix holds any state (migration refuses to
# write over it).
EMPTY = _COMMON + r"""
for _, key in ipairs({'crews', 'devices', 'tokens', 'multicrew', 'pairings', 'aliases', 'grants'}) do
  if redis.call('HLEN', P .. key) > 0 then return 0 end
end
return 1
"""

# ARGV: prefix, code.  Returns {meta hash, log hash} of the crew's log, as
# flat field/value lists.
LOG = _COMMON + r"""
return {redis.call('HGETALL', P .. 'meta:' .. ARGV[2]), redis.call('HGETALL', P .. 'log:' .. ARGV[2])}
"""
