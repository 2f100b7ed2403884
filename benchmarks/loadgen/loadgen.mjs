#!/usr/bin/env node
// LEELOO relay load generator, loopback only.
//
//   node loadgen.mjs SCENARIO --url ws://127.0.0.1:PORT/ws --server-pid PID [options]
//
// A coordinator (this process) forks --workers worker processes; each holds
// whole crews of devices, so a worker receives every delivery of the
// messages it sends.  Progress goes to stderr; exactly one JSON line of
// results goes to stdout (and to --json-out).  Every loop is bounded in count
// and time, and a watchdog (--max-seconds) ends the run with a partial
// result if anything hangs.
import fs from 'node:fs';
import os from 'node:os';
import { fork } from 'node:child_process';
import {
  nowMs, sleep, round, loopbackUrl, procRssKb, procCpuS, procAlive, machineJiffies,
  percentiles, concatF64, mergeCounts,
} from './lib.mjs';

const HELP = `usage: node loadgen.mjs SCENARIO [options]

SCENARIO (crews of --crew-size; device i registers as bench_<i> in crew-<i/K>)
  idle      connect and register --n devices (paced), hold them --hold seconds;
            the server's RSS growth per device.
  fanout    --n devices; --rate song_push messages/s from random senders for
            --duration seconds (after --warmup); deliveries, loss, duplicates,
            latency p50/p90/p99/max.
  saturate  like fanout, the rate starts at --start-rate and is multiplied by
            --ramp-factor every step until p99 > --p99-ms or a delivery is
            lost, then --refine-steps bisection steps; the highest deliveries/s
            sustained.
  storm     --n devices connect at once (at most --concurrency pending in
            total); time until all are registered, and failures.

options [defaults]
  --url URL[,URL...]      ws:// URL on a loopback address [ws://127.0.0.1:8080/ws]; several
                          (comma-separated, one per relay node): device i connects to URL i mod k,
                          so each crew spans the nodes (--spread device)
  --spread device|crew    several URLs: device i goes to URL i mod k (device), or the
                          whole crew c to URL c mod k (crew: no crew spans nodes) [device]
  --server-pid PID[,PID]  the relay's pid(s): RSS from /proc/PID/status, CPU from /proc/PID/stat,
                          summed over several (the nodes of a cluster)
  --aux-pid PID[,PID]     other server processes (Redis) whose CPU each window reports too (aux_cpu_s)
  --n N                   devices [2000]
  --crew-size K           devices per crew, 2..32 [5]
  --workers W             generator worker processes [2]
  --client raw|ws         raw: our minimal RFC 6455 client; ws: the ws package [raw]
  --hold S                idle: seconds to hold [5]
  --rate R                fanout: messages/s in total [1000]
  --duration S            fanout: measured seconds [8]
  --warmup S              fanout: unmeasured seconds first [2]
  --start-rate R          saturate: first step's messages/s [500]
  --step-seconds S        saturate: seconds per step [4]
  --ramp-factor F         saturate: rate multiplier per step [2]
  --refine-steps M        saturate: bisection steps after the first failure [3]
  --max-steps M           saturate: cap on ramp steps [12]
  --max-rate R            saturate: never offer more messages/s [200000]
  --p99-ms T              saturate: p99 threshold [50]
  --step-retries M        saturate: repeat a failed step up to M times [1]
  --disturbed-retries M   saturate: and up to M more times when other work took
                          over 15% of the machine during it [3]
  --min-send-ratio X      saturate: a step that sent less than X of its target is
                          generator-limited and ends the ramp [0.95]
  --settle S              saturate: pause between steps [1]
  --quiet-wait S          saturate: then wait up to S s for the machine to be
                          under 10% busy (other work skews a step) [10]
  --drain S               seconds to wait for outstanding deliveries [5]
  --connect-rate R        idle/fanout/saturate: new devices per second, total [2000]
  --connect-concurrency C idle/fanout/saturate: pending handshakes, total [200]
  --concurrency C         storm: pending handshakes+registrations, total [1000]
  --register-timeout S    per-device connect+register timeout [30]
  --src-ips M             spread client sockets over 127.0.0.1..127.0.0.M [1]
  --json-out FILE         also write the JSON line to FILE
  --label TEXT            copied into the result
  --max-seconds S         watchdog [900]
  --quiet                 no progress on stderr
`;

const DEFAULTS = {
  url: 'ws://127.0.0.1:8080/ws', 'server-pid': null, 'aux-pid': null, spread: 'device', n: 2000, 'crew-size': 5, workers: 2, client: 'raw',
  hold: 5, rate: 1000, duration: 8, warmup: 2,
  'start-rate': 500, 'step-seconds': 4, 'ramp-factor': 2, 'refine-steps': 3, 'max-steps': 12, 'max-rate': 200000,
  'p99-ms': 50, 'step-retries': 1, 'disturbed-retries': 3, 'min-send-ratio': 0.95, settle: 1, 'quiet-wait': 10, drain: 5,
  'connect-rate': 2000, 'connect-concurrency': 200, concurrency: 1000, 'register-timeout': 30, 'src-ips': 1,
  'json-out': null, label: '', 'max-seconds': 900, quiet: false, help: false,
};
const STRINGS = new Set(['url', 'client', 'json-out', 'label', 'server-pid', 'aux-pid', 'spread']);
const FLAGS = new Set(['quiet', 'help']);
const RANGES = {
  n: [1, 100000, true], 'crew-size': [2, 32, true], workers: [1, 16, true], hold: [0, 3600], rate: [0.1, 1e6],
  duration: [0.5, 3600], warmup: [0, 600], 'start-rate': [0.1, 1e6], 'step-seconds': [0.5, 600],
  'ramp-factor': [1.05, 16], 'refine-steps': [0, 20, true], 'max-steps': [1, 50, true], 'max-rate': [1, 1e6],
  'p99-ms': [0.01, 1e6], 'step-retries': [0, 5, true], 'disturbed-retries': [0, 10, true], 'min-send-ratio': [0, 1], settle: [0, 600], 'quiet-wait': [0, 600], drain: [0, 600],
  'connect-rate': [0, 1e6], 'connect-concurrency': [1, 100000, true], concurrency: [1, 100000, true],
  'register-timeout': [0.1, 600], 'src-ips': [1, 254, true], 'max-seconds': [1, 86400],
};
const SCENARIOS = ['idle', 'fanout', 'saturate', 'storm'];

function die(msg) {
  process.stderr.write(`loadgen: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const o = { ...DEFAULTS, scenario: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) {
      if (o.scenario) die(`unexpected argument ${JSON.stringify(a)}`);
      o.scenario = a;
      continue;
    }
    let key = a.slice(2);
    let val;
    const eq = key.indexOf('=');
    if (eq >= 0) { val = key.slice(eq + 1); key = key.slice(0, eq); }
    if (!(key in DEFAULTS)) die(`unknown option --${key} (see --help)`);
    if (FLAGS.has(key)) { o[key] = val === undefined || !/^(0|false|no)$/i.test(val); continue; }
    if (val === undefined) { if (i + 1 >= argv.length) die(`--${key} needs a value`); val = argv[++i]; }
    if (STRINGS.has(key)) { o[key] = val; continue; }
    const num = Number(val);
    const [lo, hi, int] = RANGES[key];
    if (!Number.isFinite(num) || num < lo || num > hi || (int && !Number.isInteger(num))) {
      die(`--${key} must be ${int ? 'an integer ' : ''}in [${lo}, ${hi}], got ${JSON.stringify(val)}`);
    }
    o[key] = num;
  }
  return o;
}

const opt = parseArgs(process.argv.slice(2));
if (opt.help) { process.stdout.write(HELP); process.exit(0); }
if (!SCENARIOS.includes(opt.scenario)) die(`SCENARIO must be one of ${SCENARIOS.join(', ')} (see --help)`);
if (opt.client !== 'raw' && opt.client !== 'ws') die('--client must be raw or ws');
if (opt.spread !== 'device' && opt.spread !== 'crew') die('--spread must be device or crew');
let URLS;
try { URLS = opt.url.split(',').map((u) => loopbackUrl(u.trim())); } catch (e) { die(e.message); }
const URL_ = URLS.join(',');
if (opt.client === 'raw' && URLS.some((u) => u.protocol !== 'ws:')) die('--client raw speaks ws:// only');
for (const key of ['server-pid', 'aux-pid']) {
  if (opt[key] && !/^\d+(,\d+)*$/.test(opt[key])) die(`--${key} must be a pid or comma-separated pids, got ${JSON.stringify(opt[key])}`);
  if (opt[key] && !procAlive(opt[key])) die(`--${key} ${opt[key]}: not every one is running`);
}
const AUX = opt['aux-pid'];

const T0 = nowMs();
const N = opt.n;
const K = opt['crew-size'];
const PID = opt['server-pid'];
const RUN_ID = Math.random().toString(36).slice(2, 8);
const log = (msg) => { if (!opt.quiet) process.stderr.write(`[loadgen ${((nowMs() - T0) / 1000).toFixed(1)}s] ${msg}\n`); };

// ------------------------------------------------------------ workers
const workers = [];
let rpcSeq = 0;

function startWorkers() {
  const nCrews = Math.ceil(N / K);
  const W = Math.min(opt.workers, nCrews);
  let crewAt = 0;
  for (let w = 0; w < W; w++) {
    const crews = Math.floor(nCrews / W) + (w < nCrews % W ? 1 : 0);
    const crewFrom = crewAt;
    const crewTo = crewAt + crews;
    crewAt = crewTo;
    const from = crewFrom * K;
    const to = Math.min(N, crewTo * K);
    const proc = fork(new URL('./worker.mjs', import.meta.url).pathname, [], {
      serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    const wk = { w, proc, from, to, crewFrom, crewTo, share: (to - from) / N, pending: new Map(), exited: false };
    proc.on('message', (m) => {
      const p = wk.pending.get(m.re);
      if (!p) return;
      wk.pending.delete(m.re);
      clearTimeout(p.timer);
      if (m.error) p.reject(new Error(`worker ${w}: ${m.error}`)); else p.resolve(m);
    });
    proc.on('exit', (code) => {
      wk.exited = true;
      for (const p of wk.pending.values()) { clearTimeout(p.timer); p.reject(new Error(`worker ${w} exited with ${code}`)); }
      wk.pending.clear();
    });
    workers.push(wk);
  }
}

function call(wk, cmd, args = {}, timeoutS = 60) {
  return new Promise((resolve, reject) => {
    if (wk.exited) { reject(new Error(`worker ${wk.w} is gone`)); return; }
    const seq = ++rpcSeq;
    const timer = setTimeout(() => { wk.pending.delete(seq); reject(new Error(`worker ${wk.w}: ${cmd} timed out after ${timeoutS} s`)); }, timeoutS * 1000);
    wk.pending.set(seq, { resolve, reject, timer });
    wk.proc.send({ cmd, seq, ...args });
  });
}
const all = (cmd, argsOf, timeoutS) => Promise.all(workers.map((wk) => call(wk, cmd, typeof argsOf === 'function' ? argsOf(wk) : argsOf, timeoutS)));

// ------------------------------------------------------------ measurement windows
// A window: wall time, the relay's CPU, the whole machine's CPU and the
// coordinator's own CPU.  Worker CPU comes back with each command's reply.
function openWindow(t = nowMs()) {
  const c = process.cpuUsage();
  return { t, srv: procCpuS(PID), aux: procCpuS(AUX), mach: machineJiffies(), coord_us: c.user + c.system };
}
function closeWindow(w, workerCpuUs, t = nowMs()) {
  const wall = Math.max((t - w.t) / 1000, 1e-9);
  const c = process.cpuUsage();
  const genS = (workerCpuUs + (c.user + c.system - w.coord_us)) / 1e6;
  const out = { wall_s: round(wall), gen_cpu_s: round(genS), gen_cpu_pct: round((100 * genS) / wall, 1) };
  const srv = procCpuS(PID);
  if (w.srv !== null && srv !== null) {
    out.server_cpu_s = round(srv - w.srv, 2);
    out.server_cpu_pct = round((100 * (srv - w.srv)) / wall, 1);
  }
  const aux = procCpuS(AUX);
  if (w.aux !== null && aux !== null) {
    out.aux_cpu_s = round(aux - w.aux, 2);
    out.aux_cpu_pct = round((100 * (aux - w.aux)) / wall, 1);
  }
  const m = machineJiffies();
  if (w.mach && m && m.total > w.mach.total) out.machine_busy_pct = round((100 * (m.busy - w.mach.busy)) / (m.total - w.mach.total), 1);
  addOtherLoad(out);
  return out;
}
// Machine CPU (100 = all cores) not explained by the generator and the relay:
// other processes, and kernel work charged to neither.  Jiffy-grained.
const NPROC = os.cpus().length;
function addOtherLoad(out) {
  if (out.machine_busy_pct !== undefined && out.server_cpu_pct !== undefined) {
    out.other_load_pct = round(out.machine_busy_pct - (out.gen_cpu_pct + out.server_cpu_pct) / NPROC, 1);
  }
}
// Wait (at most maxS seconds) until the machine is quiet: under 10% busy
// over half a second.  Other work on a 2-core machine skews every figure.
async function waitQuiet(maxS) {
  const until = nowMs() + maxS * 1000;
  let busy = null;
  for (let i = 0; i < maxS * 2 + 1 && nowMs() < until; i++) {
    const a = machineJiffies();
    await sleep(500);
    const b = machineJiffies();
    busy = a && b && b.total > a.total ? (100 * (b.busy - a.busy)) / (b.total - a.total) : null;
    if (busy === null || busy < 10) break;
  }
  return round(busy, 1);
}
const sum = (xs, f) => xs.reduce((s, x) => s + f(x), 0);

// ------------------------------------------------------------ result
const result = {
  tool: 'leeloo-benchmarks-loadgen', scenario: opt.scenario, label: opt.label, date: new Date().toISOString(),
  url: URL_, urls: URLS.map(String), run_id: RUN_ID,
  host: { nproc: os.cpus().length, cpu: os.cpus()[0]?.model ?? null, node: process.version, ws: null },
  params: { n: N, crew_size: K, workers: opt.workers, client: opt.client, spread: opt.spread },
  server: { pid: PID, aux_pid: AUX },
  ok: false,
};
try { result.host.ws = JSON.parse(fs.readFileSync(new URL('./node_modules/ws/package.json', import.meta.url), 'utf8')).version; } catch { /* not installed */ }

let emitted = false;
function emit() {
  if (emitted) return;
  emitted = true;
  const c = process.cpuUsage();
  result.coordinator = { cpu_s: round((c.user + c.system) / 1e6), wall_s: round((nowMs() - T0) / 1000) };
  if (PID) { result.server.alive_at_end = procAlive(PID); result.server.rss_kb_at_end = procRssKb(PID); }
  const line = JSON.stringify(result);
  process.stdout.write(line + '\n');
  if (opt['json-out']) {
    try { fs.writeFileSync(opt['json-out'], line + '\n'); } catch (e) { process.stderr.write(`loadgen: cannot write ${opt['json-out']}: ${e.message}\n`); }
  }
}
function killWorkers() {
  for (const wk of workers) if (!wk.exited) { try { wk.proc.kill('SIGKILL'); } catch { /* gone */ } }
}
const watchdog = setTimeout(() => {
  result.aborted = `watchdog: --max-seconds ${opt['max-seconds']} reached`;
  log(result.aborted);
  emit();
  killWorkers();
  process.exit(3);
}, opt['max-seconds'] * 1000);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { result.aborted = sig; emit(); killWorkers(); process.exit(130); });
}

// ------------------------------------------------------------ building blocks
const REG_S = opt['register-timeout'];

// Connect every device; rate 0 = no pacing.  Returns the merged figures.
async function connectFleet(rate, concurrency, label) {
  const startAt = nowMs() + 100;
  const expectS = rate > 0 ? N / rate : 0;
  const deadlineMs = (expectS + REG_S * (2 + Math.ceil(N / concurrency))) * 1000;
  const win = openWindow(startAt);
  const progress = setInterval(() => log(`${label}: connecting...`), 5000);
  let rs;
  try {
    rs = await all('connect', (wk) => ({
      rate: rate * wk.share, concurrency: Math.max(1, Math.round(concurrency * wk.share)), startAt, deadlineMs,
    }), deadlineMs / 1000 + 30);
  } finally { clearInterval(progress); }
  const tEnd = Math.max(...rs.map((r) => r.t_end));
  const cpu = closeWindow(win, sum(rs, (r) => r.cpu_us), tEnd);
  const registered = sum(rs, (r) => r.registered);
  const lastReg = Math.max(...rs.map((r) => r.last_registered_at));
  const per = percentiles(concatF64(rs.map((r) => r.connect_ms)));
  const out = {
    registered, failed: sum(rs, (r) => r.failed), unfinished: sum(rs, (r) => r.unfinished),
    elapsed_ms: round(tEnd - startAt, 1),
    time_to_all_registered_ms: registered === N ? round(lastReg - startAt, 1) : null,
    registrations_per_s: round(registered / Math.max((tEnd - startAt) / 1000, 1e-9), 1),
    per_device_ms: { p50: per.p50, p90: per.p90, p99: per.p99, max: per.max },
    pacing: { rate, concurrency }, ...cpu,
  };
  log(`${label}: ${registered}/${N} registered in ${(out.elapsed_ms / 1000).toFixed(2)} s, ${out.failed} failed ` +
    `(gen cpu ${cpu.gen_cpu_pct}%, server cpu ${cpu.server_cpu_pct}%)`);
  return out;
}

let phaseSeq = 0;
// One constant-rate period across all workers, drained; merged figures.
async function phase(rate, seconds) {
  const id = phaseSeq++;
  const startAt = nowMs() + 100;
  const win = openWindow(startAt);
  let sendWin = null;
  // the relay's CPU over the sending period: sampled at its nominal end, or
  // when the workers answer if that comes first (they stop at their target)
  const takeSnap = () => { if (!sendWin) sendWin = { t: nowMs(), srv: procCpuS(PID), aux: procCpuS(AUX), mach: machineJiffies() }; };
  const snap = setTimeout(takeSnap, startAt + seconds * 1000 - nowMs());
  const rs = await all('phase', (wk) => ({ phase: id, rate: rate * wk.share, seconds, startAt, drainS: opt.drain }),
    seconds + opt.drain + 30);
  clearTimeout(snap);
  takeSnap();
  const tEnd = Math.max(...rs.map((r) => r.t_end));
  const tSendEnd = Math.max(...rs.map((r) => r.t_send_end));
  const tLast = Math.max(tSendEnd, ...rs.map((r) => r.t_last_recv));
  const lat = percentiles(concatF64(rs.map((r) => r.lat)));
  const target = sum(rs, (r) => r.target);
  const sent = sum(rs, (r) => r.sent);
  const expected = sum(rs, (r) => r.expected);
  const received = sum(rs, (r) => r.received);
  const send = {
    wall_s: round((tSendEnd - startAt) / 1000),
    gen_cpu_pct: round((100 * sum(rs, (r) => r.send_cpu_us) / 1e6) / Math.max((tSendEnd - startAt) / 1000, 1e-9), 1),
  };
  if (sendWin && win.srv !== null && sendWin.srv !== null) {
    const wall = Math.max((sendWin.t - startAt) / 1000, 1e-9);
    send.server_cpu_pct = round((100 * (sendWin.srv - win.srv)) / wall, 1);
    send.server_cpu_s = round(sendWin.srv - win.srv, 3);
    if (win.aux !== null && sendWin.aux !== null) {
      send.aux_cpu_pct = round((100 * (sendWin.aux - win.aux)) / wall, 1);
      send.aux_cpu_s = round(sendWin.aux - win.aux, 3);
    }
    if (win.mach && sendWin.mach && sendWin.mach.total > win.mach.total) {
      send.machine_busy_pct = round((100 * (sendWin.mach.busy - win.mach.busy)) / (sendWin.mach.total - win.mach.total), 1);
    }
    addOtherLoad(send);
  }
  return {
    offered_msgs_per_s: round(rate, 1), seconds, target, sent, skipped: sum(rs, (r) => r.skipped),
    send_ratio: round(sent / Math.max(1, target), 4),
    achieved_msgs_per_s: round(sent / Math.max((tSendEnd - startAt) / 1000, 1e-9), 1),
    expected_deliveries: expected, received_deliveries: received, lost: expected - received,
    duplicates: sum(rs, (r) => r.dup), misrouted: sum(rs, (r) => r.misrouted), self_echo: sum(rs, (r) => r.self_echo),
    deliveries_per_s: round(received / Math.max((tLast - startAt) / 1000, 1e-9), 1),
    drain_ms: round(Math.max(0, tLast - tSendEnd), 1),
    latency_ms: lat,
    // worst latency of the messages sent in each 250 ms of the step
    worst_latency_per_250ms: Array.from(rs.reduce((m, r) => m.map((x, i) => Math.max(x, r.timeline[i] || 0)),
      new Float64Array(rs[0].timeline.length)), (x) => round(x, 1)),
    send_lag_max_ms: Math.max(...rs.map((r) => r.send_lag_max_ms || 0)),
    send, whole: closeWindow(win, sum(rs, (r) => r.cpu_us), tEnd),
  };
}

async function pingCheck() {
  const rs = await all('ping', (wk) => ({ n: Math.ceil(200 * wk.share), timeoutMs: 5000 }), 20);
  const p = percentiles(concatF64(rs.map((r) => r.rtt)));
  return { sampled: sum(rs, (r) => r.sampled), pongs: sum(rs, (r) => r.pongs), failed: sum(rs, (r) => r.failed), rtt_p50_ms: p.p50, rtt_max_ms: p.max };
}

async function openCount() {
  const rs = await all('status', {}, 20);
  return sum(rs, (r) => r.open);
}

// ------------------------------------------------------------ scenarios
async function idle() {
  Object.assign(result.params, { hold_s: opt.hold, connect_rate: opt['connect-rate'], connect_concurrency: opt['connect-concurrency'] });
  const before = procRssKb(PID);
  result.setup = await connectFleet(opt['connect-rate'], opt['connect-concurrency'], 'idle');
  await sleep(300);   // let the last replies leave the relay
  const after = procRssKb(PID);
  log(`idle: holding ${result.setup.registered} devices for ${opt.hold} s`);
  const win = openWindow();
  const c0 = await all('status', {}, 20);
  const samples = [];
  const holdEnd = nowMs() + opt.hold * 1000;
  for (let i = 0; i <= Math.ceil(opt.hold) && nowMs() < holdEnd; i++) {
    await sleep(Math.min(1000, holdEnd - nowMs()));
    samples.push(procRssKb(PID));
  }
  const c1 = await all('status', {}, 20);
  result.hold = closeWindow(win, sum(c1, (r) => r.cpu_us) - sum(c0, (r) => r.cpu_us));
  result.hold.still_open = sum(c1, (r) => r.open);
  const end = procRssKb(PID);
  result.ping_check = await pingCheck();
  const n = Math.max(1, result.setup.registered);
  if (before !== null) {
    result.server.rss_kb = { before, after_registered: after, end_of_hold: end, samples_during_hold: samples };
    result.rss_per_device_kib = round((after - before) / n, 2);
    result.rss_per_device_kib_end_of_hold = round((end - before) / n, 2);
  }
  log(`idle: server RSS ${before} -> ${after} -> ${end} KiB: ${result.rss_per_device_kib} KiB/device ` +
    `(${result.rss_per_device_kib_end_of_hold} at the end of the hold)`);
  result.ok = result.setup.registered === N && result.hold.still_open === N && result.ping_check.failed === 0;
}

async function storm() {
  result.params.concurrency = opt.concurrency;
  const before = procRssKb(PID);
  log(`storm: ${N} devices at once, at most ${opt.concurrency} pending`);
  const s = await connectFleet(0, opt.concurrency, 'storm');
  Object.assign(result, s);
  if (before !== null) result.server.rss_kb = { before, after_registered: procRssKb(PID) };
  result.ping_check = await pingCheck();
  result.ok = s.registered === N && s.failed === 0;
}

async function fanout() {
  Object.assign(result.params, { rate: opt.rate, duration_s: opt.duration, warmup_s: opt.warmup, drain_s: opt.drain });
  result.setup = await connectFleet(opt['connect-rate'], opt['connect-concurrency'], 'fanout');
  if (opt.warmup > 0) {
    const w = await phase(opt.rate, opt.warmup);
    result.warmup = { sent: w.sent, received_deliveries: w.received_deliveries, lost: w.lost, latency_p99_ms: w.latency_ms.p99 };
    await sleep(500);
  }
  log(`fanout: ${opt.rate} msg/s for ${opt.duration} s`);
  const s = await phase(opt.rate, opt.duration);
  Object.assign(result, s);
  result.unexpected_closes = N - (await openCount()) - (result.setup.failed + result.setup.unfinished);
  log(`fanout: ${s.received_deliveries}/${s.expected_deliveries} deliveries (${s.deliveries_per_s}/s), lost ${s.lost}, dup ${s.duplicates}; ` +
    `p50 ${s.latency_ms.p50} p90 ${s.latency_ms.p90} p99 ${s.latency_ms.p99} max ${s.latency_ms.max} ms; ` +
    `gen cpu ${s.send.gen_cpu_pct}%, server cpu ${s.send.server_cpu_pct}%`);
  result.ok = s.lost === 0 && s.duplicates === 0 && s.misrouted === 0 && s.self_echo === 0 && s.send_ratio >= opt['min-send-ratio'];
}

async function saturate() {
  const thr = opt['p99-ms'];
  Object.assign(result.params, {
    start_rate: opt['start-rate'], step_seconds: opt['step-seconds'], ramp_factor: opt['ramp-factor'],
    refine_steps: opt['refine-steps'], step_retries: opt['step-retries'], disturbed_retries: opt['disturbed-retries'], p99_threshold_ms: thr, drain_s: opt.drain,
  });
  result.setup = await connectFleet(opt['connect-rate'], opt['connect-concurrency'], 'saturate');
  const steps = [];
  let closedBefore = N - result.setup.registered;
  const judge = async (s) => {
    const closedNow = N - (await openCount());
    const newlyClosed = closedNow - closedBefore;
    closedBefore = closedNow;
    if (s.send_ratio < opt['min-send-ratio']) return 'generator_limited';
    if (s.lost > 0) return 'lost';
    if (s.duplicates > 0 || s.misrouted > 0 || s.self_echo > 0) return 'wrong_delivery';
    if (s.latency_ms.p99 === null || s.latency_ms.p99 > thr) return 'p99_over_threshold';
    if (newlyClosed > 0) return 'connections_closed';
    return 'pass';
  };
  let quietBefore = await waitQuiet(opt['quiet-wait']);
  const once = async (rate, kind) => {
    const s = await phase(rate, opt['step-seconds']);
    s.kind = kind;
    s.verdict = await judge(s);
    steps.push(s);
    s.machine_busy_before_pct = quietBefore;
    log(`saturate ${kind} ${rate.toFixed(0)} msg/s: ${s.deliveries_per_s} deliveries/s, p50 ${s.latency_ms.p50} ` +
      `p99 ${s.latency_ms.p99} ms, lost ${s.lost}; gen cpu ${s.send.gen_cpu_pct}%, server cpu ${s.send.server_cpu_pct}%, ` +
      `other load ${s.send.other_load_pct}% => ${s.verdict}`);
    // let a backlog from an overloaded step clear, and other work on the machine end
    await sleep(opt.settle * 1000);
    quietBefore = await waitQuiet(opt['quiet-wait']);
    return s;
  };
  // A failed step is repeated up to --step-retries times, and a failed step
  // during which other work took more than 15% of the machine up to
  // --disturbed-retries more times: other load can only make a step fail.
  const step = async (rate, kind) => {
    let s = await once(rate, kind);
    let retries = 0;
    let disturbed = 0;
    for (let guard = 0; guard < 20 && s.verdict !== 'pass' && s.verdict !== 'generator_limited'; guard++) {
      if ((s.send.other_load_pct ?? 0) > 15 && disturbed < opt['disturbed-retries']) disturbed++;
      else if (retries < opt['step-retries']) retries++;
      else break;
      s = await once(rate, 'retry');
    }
    return s;
  };
  let rate = opt['start-rate'];
  let lo = null;
  let hi = null;
  let stop = 'max_steps';
  for (let i = 0; i < opt['max-steps']; i++) {
    const s = await step(rate, 'ramp');
    if (s.verdict !== 'pass') { hi = rate; stop = s.verdict; break; }
    lo = rate;
    if (rate >= opt['max-rate']) { stop = 'max_rate'; break; }
    rate = Math.min(opt['max-rate'], rate * opt['ramp-factor']);
  }
  if (lo !== null && hi !== null && stop !== 'generator_limited') {
    for (let i = 0; i < opt['refine-steps'] && hi / lo >= 1.05; i++) {
      const mid = Math.sqrt(lo * hi);
      const s = await step(mid, 'refine');
      if (s.verdict === 'pass') lo = mid;
      else if (s.verdict === 'generator_limited') break;
      else hi = mid;
    }
  }
  const best = steps.filter((s) => s.verdict === 'pass').reduce((b, s) => (!b || s.deliveries_per_s > b.deliveries_per_s ? s : b), null);
  result.stop_reason = stop;
  result.generator_limited = steps.some((s) => s.verdict === 'generator_limited');
  result.max_sustained_deliveries_per_s = best ? best.deliveries_per_s : null;
  result.max_sustained_msgs_per_s = best ? best.offered_msgs_per_s : null;
  result.best_step = best ? {
    offered_msgs_per_s: best.offered_msgs_per_s, deliveries_per_s: best.deliveries_per_s, latency_ms: best.latency_ms,
    gen_cpu_pct: best.send.gen_cpu_pct, server_cpu_pct: best.send.server_cpu_pct, machine_busy_pct: best.send.machine_busy_pct,
    other_load_pct: best.send.other_load_pct, aux_cpu_pct: best.send.aux_cpu_pct,
  } : null;
  result.lowest_failing_msgs_per_s = hi;
  result.peak_deliveries_per_s = Math.max(0, ...steps.map((s) => s.deliveries_per_s || 0));
  result.steps = steps;
  log(`saturate: ${result.max_sustained_deliveries_per_s} deliveries/s sustained (${result.max_sustained_msgs_per_s} msg/s), ` +
    `p99 <= ${thr} ms; stopped by ${stop}`);
  result.ok = best !== null;
}

// ------------------------------------------------------------ main
async function main() {
  await waitQuiet(opt['quiet-wait']);
  const b = openWindow();
  await sleep(1000);
  result.baseline = closeWindow(b, 0);
  log(`${opt.scenario}: ${N} devices in crews of ${K}, ${Math.min(opt.workers, Math.ceil(N / K))} workers, ` +
    `client ${opt.client}, ${URL_}; machine ${result.baseline.machine_busy_pct}% busy before the run`);
  if (result.baseline.machine_busy_pct > 10) log('WARNING: other work is using the CPUs; the figures will be skewed');
  startWorkers();
  result.params.workers = workers.length;
  try {
    await all('init', (wk) => ({
      url: URLS[0].toString(), urls: URLS.map(String), spread: opt.spread, wid: wk.w, from: wk.from, to: wk.to, crewFrom: wk.crewFrom, crewTo: wk.crewTo, crewSize: K,
      client: opt.client, runId: RUN_ID, srcIps: opt['src-ips'], registerTimeoutMs: REG_S * 1000, maxSeconds: opt['max-seconds'],
    }), 20);
    if (opt.scenario === 'idle') await idle();
    else if (opt.scenario === 'storm') await storm();
    else if (opt.scenario === 'fanout') await fanout();
    else await saturate();
  } catch (e) {
    result.error = String(e && e.stack ? e.stack : e);
    log(`error: ${result.error}`);
  }
  try {
    const st = await all('status', {}, 10);
    result.generator = {
      workers: st.map((s) => ({ rss_mb: s.rss_mb, cpu_s: round(s.cpu_us / 1e6) })),
      errors: st.reduce((m, s) => mergeCounts(m, s.errors), {}),
      other_frames: st.reduce((m, s) => mergeCounts(m, s.other_frames), {}),
      bad_frames: sum(st, (s) => s.bad_frames), unexpected_closes: sum(st, (s) => s.unexpected_closes),
    };
    const closed = await all('close', {}, 15);
    result.close = { closed: sum(closed, (c) => c.closed), terminated: sum(closed, (c) => c.terminated) };
    await all('exit', {}, 5);
  } catch (e) {
    result.close_error = String(e.message || e);
  }
  clearTimeout(watchdog);
  emit();
  killWorkers();
  setTimeout(() => process.exit(result.ok ? 0 : 1), 50);
}

main();
