// The fleet page: /api/state once, then every snapshot from /api/events (server-sent events).
// Charts are drawn on plain canvases; nothing is fetched from anywhere but this server.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
// what the page last drew, for scripts and the browser test
window.fleet = { state: null, renders: 0, points: {} };
let offset = 0; // server clock minus this browser's, in seconds

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 + offset - t);
  return s < 90 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}

function num(v, digits, unit) {
  return v === null || v === undefined ? "–" : v.toFixed(digits) + (unit || "");
}

function drawChart(id, series, fmt) {
  const c = document.getElementById(id);
  const g = c.getContext("2d");
  const w = c.width, h = c.height, left = 56, right = 8, top = 8, bottom = 22;
  g.clearRect(0, 0, w, h);
  const pts = series.flatMap(s => s.values.filter(p => p[1] !== null && isFinite(p[1])));
  window.fleet.points[id] = pts.length;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#555";
  if (!pts.length) { g.fillText("no round yet", w / 2 - 30, h / 2); return; }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const X = x => left + (x - x0) / (x1 - x0) * (w - left - right);
  const Y = y => top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom);
  g.strokeStyle = "#ccc";
  g.beginPath(); g.moveTo(left, top); g.lineTo(left, h - bottom); g.lineTo(w - right, h - bottom);
  g.stroke();
  g.fillText(fmt(y1), 2, top + 8);
  g.fillText(fmt(y0), 2, h - bottom);
  g.fillText("round " + x0, left, h - 6);
  g.fillText(String(x1), w - right - 16, h - 6);
  series.forEach((s, k) => {
    const v = s.values.filter(p => p[1] !== null && isFinite(p[1]));
    g.strokeStyle = g.fillStyle = s.color;
    g.beginPath();
    v.forEach((p, i) => (i ? g.lineTo(X(p[0]), Y(p[1])) : g.moveTo(X(p[0]), Y(p[1]))));
    g.stroke();
    v.forEach(p => { g.beginPath(); g.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); g.fill(); });
    if (series.length > 1) g.fillText(s.name, w - right - 90, top + 10 + 12 * k);
  });
}

function charts(history) {
  const s = key => history.map(r => [r.round, r[key]]);
  drawChart("chart-accuracy", [{ name: "accuracy", color: "#1f6fd1", values: s("test_accuracy") }],
    v => v.toFixed(3));
  drawChart("chart-loss", [
    { name: "test", color: "#b3261e", values: s("test_loss") },
    { name: "server train", color: "#e08a00", values: s("server_train_loss") },
    { name: "device local", color: "#1f8a4c", values: s("device_local_loss") },
  ], v => v.toFixed(3));
  drawChart("chart-bytes", [
    { name: "up", color: "#6a1b9a", values: s("round_bytes_up") },
    { name: "down", color: "#00838f", values: s("round_bytes_down") },
  ], bytes);
}

function devices(list, round) {
  const body = document.querySelector("#devices tbody");
  const reported = new Set(round ? round.reported : []);
  const inRound = new Set(round ? round.participants : []);
  const gone = new Set(round ? round.gone : []);
  body.replaceChildren(...list.map(d => {
    const tr = el("tr");
    tr.dataset.id = d.id;
    const state = d.quarantined ? "quarantined" : d.online ? "online" : "offline";
    tr.dataset.state = state;
    tr.append(el("td", d.id));
    const st = el("td"); st.append(el("span", state, "badge " + state)); tr.append(st);
    const p = d.profile || {};
    tr.append(el("td", [p.profile, p.machine].filter(x => x && x !== "none").join(" · ") || "–"));
    tr.append(el("td", ago(d.last_seen), "seen"));
    tr.dataset.seen = d.last_seen || "";
    tr.append(el("td", num(d.peak_rss_mb, 0, " MB"), "num"));
    tr.append(el("td", num(d.step_ms_median, 1, " ms"), "num"));
    tr.append(el("td", bytes(d.bytes_up), "num"));
    tr.append(el("td", String(d.rejected), "num"));
    tr.append(el("td", !inRound.has(d.id) ? "" : reported.has(d.id) ? "reported"
      : gone.has(d.id) ? "left" : "training"));
    return tr;
  }));
  const on = list.filter(d => d.online).length;
  document.getElementById("device-count").textContent = `(${on} online of ${list.length})`;
}

function roundPanel(round, run) {
  const box = document.getElementById("round");
  if (!round) {
    box.textContent = run.state === "finished" ? "run finished" : "no round in progress";
    return;
  }
  const waiting = round.participants.filter(p => !round.reported.includes(p)
    && !round.gone.includes(p));
  const left = Math.max(0, round.deadline - (Date.now() / 1000 + offset));
  box.textContent = `round ${round.round} of ${run.rounds}: ${round.reported.length}/` +
    `${round.participants.length} reported, closes in at most ${left.toFixed(0)} s` +
    (waiting.length ? "; waiting for " + waiting.slice(0, 20).join(", ") +
      (waiting.length > 20 ? ` and ${waiting.length - 20} more` : "") : "");
}

function render(state) {
  offset = state.now - Date.now() / 1000;
  window.fleet.state = state;
  const r = state.run || {};
  document.getElementById("run").textContent = r.run_id ? `run ${r.run_id}: ${r.algorithm} ` +
    `${r.model} on ${r.dataset}, ${state.history.length}/${r.rounds} rounds (${r.state})` : "starting";
  devices(state.devices, state.round);
  roundPanel(state.round, r);
  charts(state.history);
  window.fleet.renders++;
}

function tick() { // ages and the deadline move between snapshots
  const s = window.fleet.state;
  if (!s) return;
  document.querySelectorAll("#devices tr[data-id]").forEach(tr => {
    tr.querySelector(".seen").textContent = ago(Number(tr.dataset.seen) || null);
  });
  roundPanel(s.round, s.run || {});
}

function link(up) {
  const b = document.getElementById("link");
  b.textContent = up ? "live" : "reconnecting";
  b.className = "badge " + (up ? "online" : "offline");
}

fetch("api/state" + q).then(r => r.ok ? r.json() : Promise.reject(r.status)).then(render)
  .catch(e => { document.getElementById("run").textContent = "cannot read api/state: " + e; });
const events = new EventSource("api/events" + q);
events.onopen = () => link(true);
events.onerror = () => link(false);  // EventSource reconnects by itself
events.onmessage = e => render(JSON.parse(e.data));
setInterval(tick, 1000);
