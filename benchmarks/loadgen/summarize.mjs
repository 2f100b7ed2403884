#!/usr/bin/env node
// One line per result file of loadgen.mjs (the JSON line it prints).
//   node summarize.mjs RESULT.json...              -> text, one line per scenario
//   node summarize.mjs --markdown RESULT.json...   -> a markdown table
import fs from 'node:fs';

const args = process.argv.slice(2);
const markdown = args[0] === '--markdown';
const files = markdown ? args.slice(1) : args;
if (!files.length) { process.stderr.write('usage: node summarize.mjs [--markdown] RESULT.json...\n'); process.exit(2); }

const f = (x, d = 1) => (x === null || x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(d));
const ORDER = ['idle', 'fanout', 'saturate', 'storm'];
const rows = [];
for (const file of files) {
  let r;
  try { r = JSON.parse(fs.readFileSync(file, 'utf8').trim().split('\n').pop()); } catch (e) {
    rows.push({ scenario: file, n: '', ok: 'ERR', gen: '', srv: '', figures: `unreadable: ${e.message}` });
    continue;
  }
  const p = r.params || {};
  let figures = '';
  let gen = null;
  let srv = null;
  if (r.scenario === 'idle') {
    const rss = r.server?.rss_kb;
    figures = `${r.setup?.registered}/${p.n} registered, ${r.setup?.failed} failed; relay RSS +${f(r.rss_per_device_kib, 2)} KiB/device ` +
      `(+${f(r.rss_per_device_kib_end_of_hold, 2)} after ${p.hold_s} s hold)` + (rss ? `; RSS ${f(rss.before / 1024)} -> ${f(rss.end_of_hold / 1024)} MiB` : '');
    gen = r.setup?.gen_cpu_pct; srv = r.setup?.server_cpu_pct;
  } else if (r.scenario === 'fanout') {
    const l = r.latency_ms || {};
    figures = `${f(p.rate, 0)} msg/s: ${f(r.deliveries_per_s, 0)} deliveries/s, ${r.received_deliveries}/${r.expected_deliveries} delivered, ` +
      `lost ${r.lost} dup ${r.duplicates}; latency p50 ${f(l.p50, 2)} p90 ${f(l.p90, 2)} p99 ${f(l.p99, 2)} max ${f(l.max, 2)} ms`;
    gen = r.send?.gen_cpu_pct; srv = r.send?.server_cpu_pct;
  } else if (r.scenario === 'saturate') {
    const b = r.best_step;
    figures = `max sustained ${f(r.max_sustained_deliveries_per_s, 0)} deliveries/s (${f(r.max_sustained_msgs_per_s, 0)} msg/s)` +
      (b ? ` p50 ${f(b.latency_ms.p50, 2)} p99 ${f(b.latency_ms.p99, 2)} ms` : '') +
      `; fails at ${f(r.lowest_failing_msgs_per_s, 0)} msg/s by ${r.stop_reason}` + (r.generator_limited ? ' (GENERATOR-LIMITED)' : '') +
      `; peak ${f(r.peak_deliveries_per_s, 0)} deliveries/s at any latency`;
    gen = b?.gen_cpu_pct; srv = b?.server_cpu_pct;
  } else if (r.scenario === 'storm') {
    figures = `${r.registered}/${p.n} registered in ${f(r.elapsed_ms / 1000, 2)} s (${f(r.registrations_per_s, 0)}/s), failed ${r.failed}` +
      `; per device p50 ${f(r.per_device_ms?.p50, 0)} p99 ${f(r.per_device_ms?.p99, 0)} ms (${p.concurrency} pending at most)`;
    gen = r.gen_cpu_pct; srv = r.server_cpu_pct;
  }
  if (r.error) figures += `; ERROR ${String(r.error).split('\n')[0]}`;
  if (r.aborted) figures += `; ABORTED ${r.aborted}`;
  const errs = r.generator?.errors;
  if (errs && Object.keys(errs).length) figures += `; errors ${JSON.stringify(errs)}`;
  rows.push({ label: r.label || '', scenario: r.scenario, n: String(p.n ?? ''), ok: r.ok ? 'ok' : 'FAIL', gen: f(gen, 0), srv: f(srv, 0), figures });
}
rows.sort((a, b) => ORDER.indexOf(a.scenario) - ORDER.indexOf(b.scenario));

const cols = [['scenario', 'scenario'], ['n', 'N'], ['ok', 'ok'], ['gen', 'gen cpu%'], ['srv', 'relay cpu%'], ['figures', 'figures']];
if (markdown) {
  process.stdout.write(`| ${cols.map((c) => c[1]).join(' | ')} |\n|${cols.map(() => '---').join('|')}|\n`);
  for (const r of rows) process.stdout.write(`| ${cols.map((c) => String(r[c[0]] ?? '').replace(/\|/g, '/')).join(' | ')} |\n`);
} else {
  const w = cols.map(([k, h]) => (k === 'figures' ? 0 : Math.max(h.length, ...rows.map((r) => String(r[k] ?? '').length))));
  const line = (vals) => vals.map((v, i) => (w[i] ? String(v).padEnd(w[i]) : String(v))).join('  ');
  process.stdout.write(line(cols.map((c) => c[1])) + '\n');
  for (const r of rows) process.stdout.write(line(cols.map((c) => r[c[0]] ?? '')) + '\n');
  process.stdout.write('gen cpu% / relay cpu%: the generator (all its processes) and the relay while loading (100 = one core)\n');
}
