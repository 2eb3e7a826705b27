// The console: reads the admin JSON every two seconds and draws it. Everything shown is set
// as text (dead letters hold whatever was sent), never parsed as HTML. A dead-letter topic's
// records (read from the broker) are read again only when its count moves, when asked, or
// every RECORDS_MS.
"use strict";

const REFRESH_MS = 2000;
const RECORDS_MS = 30000;
// After a topic's count moves, its records are read at every refresh for this long: the
// dead letter reaches the broker through the outbox, a moment after it is counted.
const SETTLE_MS = 10000;
const $ = (selector) => document.querySelector(selector);
let token = sessionStorage.getItem("admin-token") || "";
let previousStats = null;
let deadLetterTopic = "";
// The records shown: of which topic, when read, and the topic's count when it last moved.
let shown = { topic: "", at: 0, count: null, movedAt: 0 };

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    const td = cell instanceof Node ? cell : el("td", cell);
    tr.append(td instanceof HTMLTableCellElement ? td : wrap(td));
  }
  return tr;
}

function wrap(node) {
  const td = el("td");
  td.append(node);
  return td;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    $("#login").hidden = false;
    throw new Error("this host wants its admin token");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || `${path}: ${resp.status}`);
  return body;
}

function notice(text, isError = false) {
  const p = $("#notice");
  p.textContent = text;
  p.className = isError ? "error" : "";
}

function since(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(iso).toLocaleString();
}

// The latency (ms) under which a fraction `q` of `counts` fell, from bucket bounds (s).
function quantile(counts, bounds, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= q * total) return i < bounds.length ? bounds[i] * 1000 : Infinity;
  }
  return Infinity;
}

function ms(value) {
  if (value === null) return "–";
  if (value === Infinity) return "> 26 s";
  return value < 1 ? `≤ ${value.toFixed(2)} ms` : `≤ ${value.toFixed(1)} ms`;
}

// Rates and percentiles of each service between the last two readings of /stats.
function rates(stats) {
  const now = performance.now();
  const out = {};
  const before = previousStats;
  for (const s of stats.services) {
    const was = before && before.byName[s.name];
    if (!was) continue;
    const seconds = (now - before.at) / 1000;
    const requests = s.requests - was.requests;
    const buckets = s.latency_buckets.map((c, i) => c - (was.latency_buckets[i] || 0));
    out[s.name] = {
      rps: requests / seconds,
      errors: requests > 0 ? (s.errors - was.errors) / requests : null,
      p50: quantile(buckets, stats.latency_bounds_seconds, 0.5),
      p99: quantile(buckets, stats.latency_bounds_seconds, 0.99),
    };
  }
  previousStats = { at: now, byName: Object.fromEntries(stats.services.map((s) => [s.name, s])) };
  return out;
}

async function moveVersion(name, direction) {
  try {
    const moved = await api(`/components/${encodeURIComponent(name)}/${direction}`, {
      method: "POST",
      body: "{}",
    });
    notice(`${name}: ${direction === "rollback" ? "rolled back" : "rolled forward"} to ${moved.sha256.slice(0, 12)} (generation ${moved.generation})`);
  } catch (e) {
    notice(`${name}: ${e.message}`, true);
  }
  refresh();
}

function drawServices(components, perService) {
  const body = $("#services tbody");
  body.replaceChildren();
  for (const s of components.services) {
    const rate = perService[s.name];
    const back = el("button", "Roll back", { type: "button", "data-action": "rollback" });
    back.disabled = !s.rollback_to;
    back.title = s.rollback_to ? `to ${s.rollback_to.sha256.slice(0, 12)}` : "no earlier version";
    back.onclick = () => moveVersion(s.name, "rollback");
    const forward = el("button", "Roll forward", { type: "button", "data-action": "rollforward" });
    forward.disabled = !s.rollforward_to;
    forward.onclick = () => moveVersion(s.name, "rollforward");
    const actions = el("td");
    actions.append(back, " ", forward);
    const history = s.history.map((v) => v.sha256.slice(0, 8)).join(" → ");
    const rejected = s.last_rejected ? el("div", `rejected: ${s.last_rejected.error}`, { class: "error" }) : null;
    const version = el("td");
    version.append(el("span", s.sha256.slice(0, 12), { class: "digest", title: s.sha256 }));
    if (rejected) version.append(rejected);
    const tr = row([
      el("td", s.name, { class: "name" }),
      el("td", s.port ?? "–", { class: "num" }),
      el("td", s.generation, { class: "num generation" }),
      version,
      el("td", since(s.loaded_at), { title: s.loaded_at }),
      el("td", history || "–", { class: "digest" }),
      el("td", rate ? rate.rps.toFixed(1) : "…", { class: "num" }),
      el("td", rate ? ms(rate.p50) : "…", { class: "num" }),
      el("td", rate ? ms(rate.p99) : "…", { class: "num" }),
      el("td", rate && rate.errors !== null ? `${(rate.errors * 100).toFixed(1)} %` : "–", { class: "num" }),
      actions,
    ]);
    tr.dataset.service = s.name;
    tr.dataset.generation = s.generation;
    tr.dataset.sha256 = s.sha256;
    body.append(tr);
  }
  const m = components.manifest;
  const rejected = m.last_rejected ? ` — last change rejected: ${m.last_rejected.error}` : "";
  $("#manifest").textContent = `manifest generation ${m.generation}${rejected}`;
}

function drawMessaging(stats, ready) {
  const o = stats.outbox;
  $("#outbox").textContent =
    `${stats.messaging}${stats.messaging_reachable ? "" : " (unreachable)"} — outbox: ` +
    `${o.depth ?? "?"} waiting, ${o.parked ?? "?"} parked, ${o.bytes} bytes` +
    (ready.ready ? "" : " — not ready");
  const body = $("#consumers tbody");
  body.replaceChildren();
  for (const s of stats.services) {
    for (const c of s.consumes) {
      const tr = row([s.name, c.group, c.topic, c.lag ?? "–", c.dead_lettered]);
      tr.dataset.topic = c.topic;
      body.append(tr);
    }
  }
}

async function replay(choice) {
  try {
    const done = await api(`/dead-letters/${encodeURIComponent(deadLetterTopic)}/replay`, {
      method: "POST",
      body: JSON.stringify(choice),
    });
    notice(`replayed ${done.replayed} to ${done.topic}`);
  } catch (e) {
    notice(`replay: ${e.message}`, true);
  }
  shown.at = 0;
  await refresh();
}

// Whether the records of `deadLetterTopic` (whose count is now `count`) should be read again.
function recordsStale(count) {
  const now = Date.now();
  if (shown.topic !== deadLetterTopic) shown = { topic: deadLetterTopic, at: 0, count, movedAt: now };
  if (count !== shown.count) Object.assign(shown, { count, movedAt: now });
  return now - shown.at > RECORDS_MS || now - shown.movedAt < SETTLE_MS;
}

async function drawDeadLetters() {
  const { topics } = await api("/dead-letters");
  const select = $("#dlq-topic");
  const names = topics.map((t) => t.topic);
  const label = (t) => `${t.dead_letter_topic} (${t.dead_lettered})`;
  if (select.options.length !== names.length || [...select.options].some((o, i) => o.value !== names[i])) {
    select.replaceChildren(...topics.map((t) => el("option", label(t), { value: t.topic })));
  }
  topics.forEach((t, i) => { select.options[i].textContent = label(t); });
  if (!names.includes(deadLetterTopic)) deadLetterTopic = names[0] || "";
  select.value = deadLetterTopic;
  const body = $("#dead-letters tbody");
  if (!deadLetterTopic) {
    body.replaceChildren();
    return;
  }
  const topic = topics.find((t) => t.topic === deadLetterTopic);
  if (!recordsStale(topic.dead_lettered)) return;
  const { records } = await api(`/dead-letters/${encodeURIComponent(deadLetterTopic)}`);
  shown.at = Date.now();
  body.replaceChildren();
  for (const r of records) {
    const again = el("button", "Replay", { type: "button" });
    again.onclick = () => replay({ records: [{ partition: r.partition, offset: r.offset }] });
    const tr = row([
      el("td", r.partition, { class: "num" }),
      el("td", r.offset, { class: "num" }),
      el("td", r.key ?? "", { class: "digest" }),
      r.service ?? "",
      el("td", r.attempts ?? "", { class: "num" }),
      el("td", r.error ?? "", { class: "error" }),
      el("td", r.payload, { class: "payload" }),
      wrap(again),
    ]);
    const event = (r.headers || []).find(([name]) => name === "event-id");
    if (event) tr.dataset.event = event[1];
    tr.dataset.offset = r.offset;
    body.append(tr);
  }
  $("#replay-all").disabled = records.length === 0;
}

async function refresh() {
  try {
    const [components, stats, ready] = await Promise.all([api("/components"), api("/stats"), api("/readyz").catch(() => ({ ready: false }))]);
    drawServices(components, rates(stats));
    drawMessaging(stats, ready);
    await drawDeadLetters();
    $("#connection").textContent = "live";
    $("#connection").className = "badge ok";
  } catch (e) {
    $("#connection").textContent = e.message;
    $("#connection").className = "badge down";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("#token").value.trim();
    sessionStorage.setItem("admin-token", token);
    $("#login").hidden = true;
    refresh();
  });
  $("#dlq-topic").addEventListener("change", (event) => {
    deadLetterTopic = event.target.value;
    refresh();
  });
  $("#replay-all").addEventListener("click", () => replay({ all: true }));
  refresh();
  setInterval(refresh, REFRESH_MS);
});
