// One load-generator worker: holds a slice of whole crews (so every message
// it sends is delivered to devices it holds), and carries out the
// coordinator's commands over IPC.  Started by loadgen.mjs; not a CLI.
//
// Every command replies once, with its own CPU window, and is bounded in
// time: the coordinator's deadlines plus this worker's own watchdog.
import WebSocket from 'ws';
import { RawClient, nowMs, sleep, round, bump } from './lib.mjs';

if (!process.send) {
  process.stderr.write('worker.mjs is started by loadgen.mjs\n');
  process.exit(2);
}

let cfg = null;          // from the init command
let devs = [];
let crewOpen = null;     // registered & open members per local crew
let crewBase = 0;
const errors = {};
const otherFrames = {};
let unexpectedCloses = 0;
let badFrames = 0;
let closingAll = false;
const phases = new Map();
const TIMELINE_MS = 250;

const SONG = {
  artist: 'Bench Artist', track: 'Bench Track', album: 'Bench Album',
  spotify_uri: 'spotify:track:4uLU6hMCjMI75M1A2tKUQC',
  album_art_url: 'https://i.scdn.co/image/bench', note: 'leeloo benchmark',
};

function cpuUs() {
  const c = process.cpuUsage();
  return c.user + c.system;
}

// ------------------------------------------------------------ connections
function openSocket(dev) {
  const local = cfg.srcIps > 1 ? `127.0.0.${1 + (dev.i % cfg.srcIps)}` : undefined;
  // Several relay nodes: device i goes to node i mod k, so a crew spans
  // them (or, --spread crew, crew c to node c mod k).
  const url = cfg.urls && cfg.urls.length > 1
    ? cfg.urls[(cfg.spread === 'crew' ? dev.crew : dev.i) % cfg.urls.length] : cfg.url;
  if (cfg.client === 'raw') return new RawClient(url, { handshakeTimeout: cfg.registerTimeoutMs, localAddress: local });
  return new WebSocket(url, {
    perMessageDeflate: false, handshakeTimeout: cfg.registerTimeoutMs, skipUTF8Validation: true,
    followRedirects: false, maxPayload: 1 << 20, ...(local ? { localAddress: local } : {}),
  });
}

// Open one device and register it; resolves true once "registered" arrives.
function connectOne(dev) {
  return new Promise((resolve) => {
    let settled = false;
    let ws = null;
    dev.state = 'connecting';
    dev.tStart = nowMs();
    const fail = (why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      dev.state = 'failed';
      bump(errors, why);
      try { if (ws) ws.terminate(); } catch { /* already gone */ }
      resolve(false);
    };
    const timer = setTimeout(() => fail('register_timeout'), cfg.registerTimeoutMs);
    try { ws = openSocket(dev); } catch (e) { fail(`connect:${e.code || e.message}`); return; }
    dev.ws = ws;
    ws.on('open', () => {
      ws.send(JSON.stringify({ type: 'register', device_id: dev.id, crew_code: `crew-${dev.crew}`, device_name: `d${dev.i}` }));
    });
    ws.on('message', (data, isBinary) => {
      if (settled) { onFrame(dev, data, isBinary); return; }
      let m;
      try { m = JSON.parse(data.toString()); } catch { fail('bad_json_before_registered'); return; }
      if (m && m.type === 'registered') {
        settled = true;
        clearTimeout(timer);
        dev.tReg = nowMs();
        dev.state = 'registered';
        crewOpen[dev.crew - crewBase]++;
        resolve(true);
      } else {
        bump(otherFrames, `before_registered:${m && m.type}`);
      }
    });
    ws.on('unexpected-response', (req, res) => fail(`http_${res.statusCode}`));
    ws.on('error', (e) => {
      if (settled && dev.state === 'registered') bump(errors, `after_registered:${e.code || e.message}`);
      fail(`error:${e.code || e.message}`);
    });
    ws.on('close', (code) => {
      if (!settled) { fail(`closed_before_registered:${code}`); return; }
      if (dev.state !== 'registered') return;
      dev.state = 'closed';
      crewOpen[dev.crew - crewBase]--;
      if (!closingAll) { unexpectedCloses++; bump(errors, `unexpected_close:${code}`); }
    });
  });
}

// Open every device not yet opened, at most `rate`/s (0: no limit) and
// `concurrency` pending, starting at epoch ms `startAt`.
async function connectAll({ rate, concurrency, startAt, deadlineMs }) {
  const todo = devs.filter((d) => d.state === 'new');
  await sleep(startAt - nowMs());
  const t0 = nowMs();
  const c0 = cpuUs();
  let next = 0;
  let pending = 0;
  let done = 0;
  let ok = 0;
  await new Promise((resolve) => {
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearInterval(iv);
      clearTimeout(dl);
      resolve();
    };
    const pump = () => {
      if (finished) return;
      const allowed = rate > 0 ? Math.min(todo.length, Math.floor(((nowMs() - t0) / 1000) * rate) + 1) : todo.length;
      for (let burst = 0; next < allowed && pending < concurrency && burst < 5000; burst++) {
        const dev = todo[next++];
        pending++;
        connectOne(dev).then((r) => {
          pending--;
          done++;
          if (r) ok++;
          if (done === todo.length) finish();
          else if (next < todo.length) setImmediate(pump);
        });
      }
    };
    const iv = setInterval(pump, 2);
    const dl = setTimeout(finish, deadlineMs);
    if (todo.length === 0) finish(); else pump();
  });
  const tEnd = nowMs();
  const times = new Float64Array(todo.filter((d) => d.tReg > 0).map((d) => d.tReg - d.tStart));
  return {
    launched: next, done, registered: ok, failed: done - ok, unfinished: todo.length - done,
    t_start: t0, t_end: tEnd, last_registered_at: todo.reduce((m, d) => Math.max(m, d.tReg || 0), 0),
    connect_ms: times, cpu_us: cpuUs() - c0,
  };
}

// ------------------------------------------------------------ messages
function newPhase(id, rate, seconds) {
  const cap = Math.ceil(rate * seconds) + 16;
  const ph = {
    id, rate, seconds, cap, target: Math.floor(rate * seconds),
    mask: new Uint32Array(cap), lat: new Float64Array(cap * (cfg.crewSize - 1)), nLat: 0,
    // the worst latency of the messages sent in each TIMELINE_MS slice: shows
    // whether slow deliveries come in bursts (a stall) or all along (a queue)
    timeline: new Float64Array(Math.ceil((seconds * 1000 + 500) / TIMELINE_MS)),
    sent: 0, skipped: 0, expected: 0, received: 0, dup: 0, misrouted: 0, selfEcho: 0, late: 0,
    open: true, tStart: 0, tSendEnd: 0, tLastRecv: 0, lagMax: 0,
  };
  phases.set(id, ph);
  return ph;
}

function onFrame(dev, data, isBinary) {
  const tRecv = nowMs();
  if (closingAll) return;
  if (isBinary) { badFrames++; return; }
  let m;
  try { m = JSON.parse(data.toString()); } catch { badFrames++; return; }
  if (!m || typeof m !== 'object') { badFrames++; return; }
  if (m.type === 'pong') {
    if (dev.pong) { const r = dev.pong; dev.pong = null; r(tRecv); } else bump(otherFrames, 'pong_unasked');
    return;
  }
  const b = m.type === 'message' && m.payload && m.payload.bench;
  if (!b || b.r !== cfg.runId) { bump(otherFrames, String(m.type)); return; }
  const ph = phases.get(b.p);
  if (!ph || b.w !== cfg.wid || !(b.q >= 0 && b.q < ph.sent)) { badFrames++; return; }
  if (b.c !== dev.crew || m.from_device !== `bench_${b.s}`) { ph.misrouted++; return; }
  if (b.s === dev.i) { ph.selfEcho++; return; }
  const bit = (1 << dev.pos) >>> 0;
  if (ph.mask[b.q] & bit) { ph.dup++; return; }
  ph.mask[b.q] |= bit;
  if (!ph.open) { ph.late++; return; }
  ph.received++;
  const l = tRecv - b.t;
  ph.lat[ph.nLat++] = l;
  const slot = Math.min(ph.timeline.length - 1, Math.max(0, Math.floor((b.t - ph.tStart) / TIMELINE_MS)));
  if (l > ph.timeline[slot]) ph.timeline[slot] = l;
  ph.tLastRecv = tRecv;
}

function sendOne(ph, senders, intended) {
  const q = ph.sent;
  for (let tries = 0; tries < 8; tries++) {
    const d = senders[(Math.random() * senders.length) | 0];
    const others = crewOpen[d.crew - crewBase] - 1;
    if (d.state !== 'registered' || d.ws.readyState !== 1 || others < 1) continue;
    const t = nowMs();
    const payload = { ...SONG, bench: { r: cfg.runId, w: cfg.wid, p: ph.id, q, c: d.crew, s: d.i, t, id: `${cfg.runId}.${cfg.wid}.${ph.id}.${q}` } };
    ph.expected += others;
    ph.sent++;
    if (t - intended > ph.lagMax) ph.lagMax = t - intended;
    d.ws.send(JSON.stringify({ type: 'message', msg_type: 'song_push', payload }));
    return;
  }
  ph.skipped++;
  ph.sent++;   // keeps sequence numbers dense; nothing is expected for it
}

async function runPhase({ phase, rate, seconds, startAt, drainS }) {
  const ph = newPhase(phase, rate, seconds);
  const senders = devs.filter((d) => d.state === 'registered' && crewOpen[d.crew - crewBase] >= 2);
  await sleep(startAt - nowMs());
  const c0 = cpuUs();
  let cSend = c0;
  if (senders.length && ph.target > 0) {
    await new Promise((resolve) => {
      const start = nowMs();
      ph.tStart = start;
      const endAt = start + seconds * 1000;
      const perMs = rate / 1000;
      const maxBurst = Math.max(1, Math.ceil(rate * 0.05));   // at most 50 ms worth per tick
      const tick = () => {
        const now = nowMs();
        const due = Math.min(ph.target, Math.floor((now - start) * perMs) + 1);
        for (let burst = 0; ph.sent < due && burst < maxBurst; burst++) sendOne(ph, senders, start + ph.sent / perMs);
        // stop at the target, or 250 ms past the nominal end if we fell behind
        if (ph.sent >= ph.target || now >= endAt + 250) {
          clearInterval(iv);
          ph.tSendEnd = nowMs();
          cSend = cpuUs();
          resolve();
        }
      };
      const iv = setInterval(tick, 1);
      tick();
    });
  } else {
    ph.tStart = ph.tSendEnd = nowMs();
  }
  const until = nowMs() + drainS * 1000;
  for (let i = 0; i < drainS * 200 + 2 && ph.received < ph.expected && nowMs() < until; i++) await sleep(5);
  ph.open = false;
  const tEnd = nowMs();
  const out = {
    phase, target: ph.target, sent: ph.sent - ph.skipped, skipped: ph.skipped, senders: senders.length,
    expected: ph.expected, received: ph.received, dup: ph.dup, misrouted: ph.misrouted, self_echo: ph.selfEcho,
    t_start: ph.tStart, t_send_end: ph.tSendEnd, t_last_recv: ph.tLastRecv, t_end: tEnd, send_lag_max_ms: round(ph.lagMax),
    lat: ph.lat.slice(0, ph.nLat), timeline: ph.timeline, send_cpu_us: cSend - c0, cpu_us: cpuUs() - c0,
  };
  // keep the masks for late/duplicate counting a little longer, drop the samples
  ph.lat = new Float64Array(0);
  for (const id of [...phases.keys()]) if (id < phase - 2) phases.delete(id);
  return out;
}

// ------------------------------------------------------------ checks and close
async function pingSample({ n, timeoutMs }) {
  const open = devs.filter((d) => d.state === 'registered' && d.ws.readyState === 1);
  const step = Math.max(1, Math.floor(open.length / Math.max(1, n)));
  const sample = [];
  for (let i = 0; i < open.length && sample.length < n; i += step) sample.push(open[i]);
  const rtts = [];
  let failed = 0;
  await Promise.all(sample.map((d) => new Promise((resolve) => {
    const t = nowMs();
    const to = setTimeout(() => { d.pong = null; failed++; resolve(); }, timeoutMs);
    d.pong = (tr) => { clearTimeout(to); rtts.push(tr - t); resolve(); };
    d.ws.send('{"type":"ping"}');
  })));
  return { sampled: sample.length, pongs: rtts.length, failed, rtt: new Float64Array(rtts) };
}

async function closeAll() {
  closingAll = true;
  let graceful = 0;
  for (const d of devs) {
    if (!d.ws) continue;
    if (d.ws.readyState === 1) { graceful++; d.ws.close(1000); } else if (d.ws.readyState === 0) d.ws.terminate();
  }
  const until = nowMs() + 5000;
  for (let i = 0; i < 250 && nowMs() < until; i++) {
    if (!devs.some((d) => d.ws && d.ws.readyState !== 3)) break;
    await sleep(20);
  }
  let forced = 0;
  for (const d of devs) if (d.ws && d.ws.readyState !== 3) { forced++; d.ws.terminate(); }
  return { closed: graceful - forced, terminated: forced };
}

function status() {
  return {
    open: devs.filter((d) => d.state === 'registered' && d.ws.readyState === 1).length,
    unexpected_closes: unexpectedCloses, errors, other_frames: otherFrames, bad_frames: badFrames,
    rss_mb: round(process.memoryUsage().rss / 1048576, 1), cpu_us: cpuUs(),
  };
}

// ------------------------------------------------------------ command loop
const handlers = {
  init(m) {
    cfg = m;
    crewBase = m.crewFrom;
    crewOpen = new Int32Array(m.crewTo - m.crewFrom);
    devs = [];
    for (let i = m.from; i < m.to; i++) {
      devs.push({ i, crew: Math.floor(i / m.crewSize), pos: i % m.crewSize, id: `bench_${i}`, ws: null,
        state: 'new', tStart: 0, tReg: 0, pong: null });
    }
    // our own watchdog: never outlive the coordinator's budget
    setTimeout(() => process.exit(3), (m.maxSeconds + 30) * 1000).unref();
    return { devices: devs.length, cpu_us: cpuUs() };
  },
  connect: connectAll,
  phase: runPhase,
  ping: pingSample,
  status,
  close: closeAll,
  exit() { setTimeout(() => process.exit(0), 20); return {}; },
};

process.on('message', async (m) => {
  const h = handlers[m.cmd];
  let reply;
  try {
    reply = h ? await h(m) : { error: `unknown command ${m.cmd}` };
  } catch (e) {
    reply = { error: String(e && e.stack ? e.stack : e) };
  }
  process.send({ re: m.seq, ...reply });
});
// the coordinator went away: so do we
process.on('disconnect', () => process.exit(0));
