#!/usr/bin/env node
// WSS devices for benchmarks/tls_bench.py -- loopback only, no dependencies.
//
//   node tls_client.mjs --port P --ca CA.pem --servername NAME --n N
//        [--concurrency C] [--hold S] [--max-seconds S] [--crew-size K] [--plain 1]
//        [--offset K]  (device numbers start at K: device ids and source addresses)
//
// Opens N TLS connections to 127.0.0.1:P (verifying the server against
// CA.pem for NAME; --plain 1: plain TCP instead), upgrades each to a WebSocket on /ws and registers it
// into crews of K, with at most C handshakes pending at once.  When all are
// registered (or failed) it prints ONE JSON line on stdout, then holds the
// connections until stdin closes or --hold seconds pass, and exits.
// Every loop is bounded by N; a watchdog ends the process after
// --max-seconds whatever happens.

import tls from 'node:tls';
import net from 'node:net';
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith('--')) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const port = Number(args.port);
const host = '127.0.0.1';
const n = Math.min(Number(args.n ?? 2000), 65000);
const offset = Number(args.offset ?? 0);
const concurrency = Number(args.concurrency ?? 500);
const hold = Number(args.hold ?? 60);
const maxSeconds = Number(args['max-seconds'] ?? 120);
const crewSize = Number(args['crew-size'] ?? 5);
const ca = fs.readFileSync(args.ca);
const servername = args.servername;
const plain = args.plain === '1';

setTimeout(() => { finish('watchdog'); process.exit(2); }, maxSeconds * 1000).unref();

function frame(text) {
  // A masked client text frame (payloads here are < 126 bytes).
  const payload = Buffer.from(text);
  const mask = randomBytes(4);
  const out = Buffer.alloc(6 + payload.length);
  out[0] = 0x81;
  out[1] = 0x80 | payload.length;
  mask.copy(out, 2);
  for (let i = 0; i < payload.length; i++) out[6 + i] = payload[i] ^ mask[i % 4];
  return out;
}

const sockets = [];
let started = 0, registered = 0, failed = 0, pending = 0;
const errors = {};
const t0 = performance.now();
let reported = false;

function finish(why) {
  if (reported) return;
  reported = true;
  const seconds = (performance.now() - t0) / 1000;
  process.stdout.write(JSON.stringify({ n, registered, failed, seconds, errors, why }) + '\n');
}

function done(ok, reason) {
  pending--;
  if (ok) registered++; else { failed++; errors[reason] = (errors[reason] ?? 0) + 1; }
  if (registered + failed === n) finish('all');
  else launch();
}

function open(i) {
  pending++;
  let state = 'tls', buffer = Buffer.alloc(0), settled = false;
  const settle = (ok, reason) => { if (!settled) { settled = true; done(ok, reason); } };
  const onConnect = () => {
    state = 'http';
    const key = randomBytes(16).toString('base64');
    socket.write(`GET /ws HTTP/1.1\r\nHost: ${servername}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
                 `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  };
  // Each device from its own loopback address (127.1.0.1, 127.1.0.2, ...),
  // as devices in the field are: the relay limits crew entries per address.
  const localAddress = `127.1.${((i + 1) >> 8) & 255}.${(i + 1) & 255}`;
  const socket = plain
    ? net.connect({ host, port, localAddress }, onConnect)
    : tls.connect({ host, port, localAddress, ca, servername, ALPNProtocols: ['http/1.1'] }, onConnect);
  sockets.push(socket);
  socket.setNoDelay(true);
  socket.on('data', (data) => {
    if (settled) return;
    buffer = Buffer.concat([buffer, data]);
    if (state === 'http') {
      const end = buffer.indexOf('\r\n\r\n');
      if (end < 0) return;
      if (!buffer.subarray(0, 12).toString().startsWith('HTTP/1.1 101')) return settle(false, 'upgrade');
      buffer = buffer.subarray(end + 4);
      state = 'ws';
      const crew = `crew-${Math.floor(i / crewSize)}`;
      socket.write(frame(JSON.stringify({ type: 'register', device_id: `leeloo_${i.toString(16).padStart(12, '0')}`, crew_code: crew })));
    }
    if (state === 'ws' && buffer.length >= 2) {
      const length = buffer[1] & 0x7f;
      if (buffer.length >= 2 + length) {
        const registered = buffer.subarray(2, 2 + length).toString().includes('"registered"');
        state = 'held';
        settle(registered, registered ? undefined : 'refused');
      }
    }
  });
  socket.on('error', (e) => settle(false, e.code ?? 'error'));
  socket.on('close', () => settle(false, 'closed'));
}

function launch() {
  while (pending < concurrency && started < n) open(offset + started++);
}

launch();
const release = () => { for (const s of sockets) s.destroy(); process.exit(0); };
setTimeout(release, hold * 1000).unref();
process.stdin.on('end', release);
process.stdin.resume();
const keepAlive = setInterval(() => {}, 1000);
setTimeout(() => clearInterval(keepAlive), (maxSeconds + 1) * 1000).unref();
