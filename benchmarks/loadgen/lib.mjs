// Shared pieces of the load generator: the clock, /proc readers, statistics,
// the loopback guard and a minimal RFC 6455 client.
import net from 'node:net';
import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { createHash, randomBytes, randomFillSync } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { performance } from 'node:perf_hooks';

// One clock for every process: milliseconds since the Unix epoch with
// sub-microsecond resolution.  Each process has its own timeOrigin, but
// timeOrigin + now() is the same wall clock in all of them, so a timestamp
// written by one worker can be subtracted from another's.
export const nowMs = () => performance.timeOrigin + performance.now();

export const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

export const round = (x, d = 3) => (x === null || x === undefined || !Number.isFinite(x) ? null : Number(x.toFixed(d)));

// ------------------------------------------------------------ loopback guard
export function loopbackUrl(text) {
  let u;
  try { u = new URL(text); } catch { throw new Error(`not a URL: ${text}`); }
  if (u.protocol !== 'ws:' && u.protocol !== 'wss:') throw new Error(`URL must be ws:// or wss://, got ${u.protocol}`);
  const host = u.hostname.replace(/^\[|\]$/g, '');
  const ok = host === 'localhost'
    || (net.isIPv4(host) && host.startsWith('127.'))
    || (net.isIPv6(host) && (host === '::1' || /^::ffff:127\./i.test(host)));
  if (!ok) throw new Error(`refusing ${host}: the load generator only talks to loopback (127.0.0.0/8, ::1, localhost)`);
  return u;
}

// ------------------------------------------------------------ /proc readers
let CLK_TCK = 100;
try { CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8', timeout: 2000 }).trim()) || 100; } catch { /* 100 */ }

// A pid, or several comma-separated (summed): the nodes of a cluster.
function eachPid(pid, f) {
  const pids = String(pid).split(',');
  if (pids.length === 1) return f(pids[0]);
  let total = 0;
  for (const p of pids) {
    const v = f(p);
    if (v === null) return null;
    total += v;
  }
  return total;
}

export function procRssKb(pid) {
  if (!pid) return null;
  if (String(pid).includes(',')) return eachPid(pid, procRssKb);
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch { return null; }
}

// utime + stime of a process, in seconds
export function procCpuS(pid) {
  if (!pid) return null;
  if (String(pid).includes(',')) return eachPid(pid, procCpuS);
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch { return null; }
}

export function procAlive(pid) {
  return !!pid && String(pid).split(',').every((p) => fs.existsSync(`/proc/${p}/stat`));
}

// whole-machine jiffies: busy and total
export function machineJiffies() {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
    const [user, nice, system, idle, iowait, irq, softirq, steal] = f;
    const busy = user + nice + system + irq + softirq + (steal || 0);
    return { busy, total: busy + idle + iowait };
  } catch { return null; }
}

// ------------------------------------------------------------ statistics
export function percentiles(values, n = values.length) {
  if (!n) return { n: 0, p50: null, p90: null, p99: null, p999: null, max: null, mean: null };
  const a = Float64Array.from(values.subarray ? values.subarray(0, n) : values.slice(0, n));
  a.sort();
  const q = (p) => a[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))];
  let sum = 0;
  for (let i = 0; i < n; i++) sum += a[i];
  return { n, p50: round(q(0.5)), p90: round(q(0.9)), p99: round(q(0.99)), p999: round(q(0.999)), max: round(a[n - 1]), mean: round(sum / n) };
}

export function concatF64(arrays) {
  let n = 0;
  for (const a of arrays) n += a.length;
  const out = new Float64Array(n);
  let o = 0;
  for (const a of arrays) { out.set(a, o); o += a.length; }
  return out;
}

const MAX_KEYS = 40;
export function bump(map, key, by = 1) {
  if (key in map) map[key] += by;
  else if (Object.keys(map).length < MAX_KEYS) map[key] = by;
  else map.other = (map.other || 0) + by;
}

export function mergeCounts(into, from) {
  for (const [k, v] of Object.entries(from || {})) bump(into, k, v);
  return into;
}

// ------------------------------------------------------------ minimal client
// Just enough RFC 6455 for a device: the upgrade, masked text frames out,
// unmasked text/ping/pong/close frames in.  It exposes the subset of the ws
// package's API the worker uses (readyState, send, close, terminate; events
// open, message, error, close, unexpected-response) and costs the generator
// less CPU per connection than the ws package.
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const KEY = randomBytes(16).toString('base64');          // one key per process: the server cannot tell
const ACCEPT = createHash('sha1').update(KEY + GUID).digest('base64');
const MAX_IN_FRAME = 1 << 20;
const MASKS = Buffer.alloc(4096);
let maskAt = MASKS.length;

function frame(opcode, payload) {
  const len = payload.length;
  const head = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const out = Buffer.allocUnsafe(head + 4 + len);
  out[0] = 0x80 | opcode;
  if (len < 126) out[1] = 0x80 | len;
  else if (len < 65536) { out[1] = 0x80 | 126; out.writeUInt16BE(len, 2); }
  else { out[1] = 0x80 | 127; out.writeUInt32BE(0, 2); out.writeUInt32BE(len, 6); }
  if (maskAt + 4 > MASKS.length) { randomFillSync(MASKS); maskAt = 0; }
  const m0 = MASKS[maskAt], m1 = MASKS[maskAt + 1], m2 = MASKS[maskAt + 2], m3 = MASKS[maskAt + 3];
  MASKS.copy(out, head, maskAt, maskAt + 4);
  maskAt += 4;
  const o = head + 4;
  let i = 0;
  for (; i + 3 < len; i += 4) {
    out[o + i] = payload[i] ^ m0; out[o + i + 1] = payload[i + 1] ^ m1;
    out[o + i + 2] = payload[i + 2] ^ m2; out[o + i + 3] = payload[i + 3] ^ m3;
  }
  const m = [m0, m1, m2, m3];
  for (; i < len; i++) out[o + i] = payload[i] ^ m[i & 3];
  return out;
}

export class RawClient extends EventEmitter {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  constructor(url, { handshakeTimeout = 30000, localAddress } = {}) {
    super();
    this.readyState = 0;
    this.buf = null;
    this.parts = null;
    this.closeCode = 1006;
    this.closeSent = false;
    this.timer = null;
    const u = typeof url === 'string' ? new URL(url) : url;
    const host = u.hostname.replace(/^\[|\]$/g, '');
    const opts = { host, port: Number(u.port) || 80 };
    if (localAddress) opts.localAddress = localAddress;
    if (u.protocol !== 'ws:') throw new Error('the raw client speaks ws:// only');
    const request = `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
      `Connection: Upgrade\r\nSec-WebSocket-Key: ${KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
    this.sock = net.connect(opts, () => this.sock.write(request));
    this.sock.setNoDelay(true);
    this.sock.on('data', (d) => this._data(d));
    this.sock.on('error', (e) => this.emit('error', e));
    this.sock.on('close', () => this._closed());
    this.timer = setTimeout(() => {
      if (this.readyState === 0) { this.emit('error', Object.assign(new Error('handshake timeout'), { code: 'handshake_timeout' })); this.sock.destroy(); }
    }, handshakeTimeout);
  }

  _fail(code) {
    this.emit('error', Object.assign(new Error(code), { code }));
    this.sock.destroy();
  }

  _data(d) {
    this.buf = this.buf ? Buffer.concat([this.buf, d]) : d;
    if (this.readyState === 0) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end < 0) { if (this.buf.length > 16384) this._fail('handshake_too_large'); return; }
      const head = this.buf.toString('latin1', 0, end);
      const status = /^HTTP\/1\.[01] (\d{3})/.exec(head);
      clearTimeout(this.timer);
      if (!status || status[1] !== '101') {
        this.emit('unexpected-response', null, { statusCode: status ? Number(status[1]) : 0 });
        this.sock.destroy();
        return;
      }
      const accept = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(head);
      if (!accept || accept[1] !== ACCEPT) { this._fail('bad_accept'); return; }
      this.buf = this.buf.length > end + 4 ? this.buf.subarray(end + 4) : null;
      this.readyState = 1;
      this.emit('open');
      if (!this.buf) return;
    }
    this._frames();
  }

  _frames() {
    // bounded: each pass consumes one whole frame or returns
    for (let guard = 0; guard < 100000 && this.buf && this.readyState !== 3; guard++) {
      const b = this.buf;
      if (b.length < 2) return;
      const fin = (b[0] & 0x80) !== 0;
      const op = b[0] & 0x0f;
      let len = b[1] & 0x7f;
      let at = 2;
      if (len === 126) { if (b.length < 4) return; len = b.readUInt16BE(2); at = 4; }
      else if (len === 127) { if (b.length < 10) return; if (b.readUInt32BE(2)) { this._fail('frame_too_large'); return; } len = b.readUInt32BE(6); at = 10; }
      if (len > MAX_IN_FRAME) { this._fail('frame_too_large'); return; }
      if (b[1] & 0x80) { this._fail('masked_server_frame'); return; }
      if (b.length < at + len) return;
      const payload = b.subarray(at, at + len);
      this.buf = b.length > at + len ? b.subarray(at + len) : null;
      if (op === 0x8) {
        this.closeCode = len >= 2 ? payload.readUInt16BE(0) : 1005;
        if (!this.closeSent) { this.closeSent = true; this.sock.write(frame(0x8, payload.subarray(0, Math.min(2, len)))); }
        this.readyState = 2;
        this.sock.end();
        this._closeTimer();
        return;
      }
      if (op === 0x9) { if (!this.closeSent) this.sock.write(frame(0xa, payload)); continue; }
      if (op === 0xa) continue;
      if (op === 0x0 || op === 0x1 || op === 0x2) {
        if (!fin) { (this.parts ||= []).push(payload); continue; }
        let data = payload;
        if (this.parts) { this.parts.push(payload); data = Buffer.concat(this.parts); this.parts = null; }
        if (this.readyState === 1) this.emit('message', data, op === 0x2);
        continue;
      }
      this._fail(`bad_opcode_${op}`);
      return;
    }
  }

  _closeTimer() {
    if (!this.timer) this.timer = setTimeout(() => this.sock.destroy(), 2000);
    else { clearTimeout(this.timer); this.timer = setTimeout(() => this.sock.destroy(), 2000); }
  }

  _closed() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    clearTimeout(this.timer);
    this.emit('close', this.closeCode);
  }

  send(text) {
    if (this.readyState === 1) this.sock.write(frame(0x1, Buffer.from(text)));
  }

  close(code = 1000) {
    if (this.readyState === 0) { this.terminate(); return; }
    if (this.readyState !== 1) return;
    const p = Buffer.alloc(2);
    p.writeUInt16BE(code, 0);
    this.closeSent = true;
    this.readyState = 2;
    this.sock.write(frame(0x8, p));
    this._closeTimer();
  }

  terminate() {
    this.sock.destroy();
  }
}
