// The pto broker dashboard: polls /api/status a few times a second and redraws.
// Plain DOM and SVG, no libraries: it must work with no internet.
"use strict";

const POLL_MS = 250;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const kid of kids) node.append(kid instanceof Node ? kid : String(kid));
  return node;
}

function fmtInt(n) { return Number(n || 0).toLocaleString("en-US"); }

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  n = Number(n || 0);
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? n.toFixed(1) + " " + units[i] : n + " B";
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "> 30 s";
  return ms < 1 ? (ms * 1000).toFixed(0) + " us" : ms < 1000 ? ms.toFixed(ms < 10 ? 1 : 0) + " ms"
    : (ms / 1000).toFixed(1) + " s";
}

function fmtUptime(s) {
  s = Math.floor(s || 0);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return "up " + (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}

function fmtTime(t) { return new Date(t * 1000).toLocaleTimeString("en-GB"); }

function fill(tbody, rows, empty, cols) {
  tbody.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: cols, class: "empty" }, empty))]));
}

function drawChips(chips, queues) {
  const box = $("chips");
  if (!chips.length) { box.replaceChildren(el("span", { class: "empty" }, "no workers connected")); return; }
  box.replaceChildren(...chips.map((c) => {
    const nums = el("div", { class: "nums" },
      "in flight ", el("b", {}, fmtInt(c.inflight)),
      " \u00b7 queue ", el("b", {}, fmtInt(queues[c.chip] || 0)), el("br"),
      "done ", el("b", { class: "done" }, fmtInt(c.done)),
      " \u00b7 failed ", el("b", { class: c.failed ? "bad" : "" }, fmtInt(c.failed)),
      c.restarts ? el("span", { class: "bad" }, " \u00b7 restarts " + c.restarts) : "");
    return el("div", { class: "chip" + (c.busy ? " busy" : ""), "data-chip": c.chip },
      el("span", { class: "state" }, c.busy ? "BUSY" : "IDLE"),
      el("div", { class: "name" }, c.chip.startsWith("host") ? c.chip + " worker" : "chip " + c.chip),
      el("div", { class: "kernel" }, c.running || (c.busy ? "(queued)" : "\u2014")),
      nums);
  }));
}

function drawChart(rates) {
  const svg = $("chart"), W = 600, H = 180, L = 44, B = 18;
  const pts = rates.filter((r) => r.t >= -300);
  // the last 5 minutes, or less while the broker is younger (at least 1 minute)
  const span = Math.min(300, Math.max(60, Math.ceil(-Math.min(0, ...pts.map((r) => r.t)) / 60) * 60));
  const top = Math.max(1, ...pts.map((r) => r.done + r.failed));
  const scale = niceCeil(top);
  const x = (t) => L + (W - L - 4) * (1 + t / span);
  const y = (v) => H - B - (H - B - 6) * (v / scale);
  const ns = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const kids = [];
  for (const f of [0, 0.5, 1]) {
    kids.push(mk("line", { x1: L, x2: W, y1: y(scale * f), y2: y(scale * f), stroke: "#e2e5ea" }));
    kids.push(mk("text", { x: L - 6, y: y(scale * f) + 4, "text-anchor": "end" }, fmtInt(scale * f)));
  }
  const step = span <= 60 ? 15 : 60;
  for (let t = -span; t <= 0; t += step) {
    kids.push(mk("text", { x: x(t), y: H - 4, "text-anchor": t === 0 ? "end" : t === -span ? "start" : "middle" },
      t === 0 ? "now" : step < 60 ? t + " s" : (t / 60) + " min"));
  }
  for (const [key, color] of [["done", "#2f6fde"], ["failed", "#d64545"]]) {
    if (pts.length > 1) {
      const d = pts.map((r) => x(r.t).toFixed(1) + "," + y(r[key]).toFixed(1)).join(" ");
      kids.push(mk("polyline", { points: d, fill: "none", stroke: color, "stroke-width": 2 }));
    }
  }
  svg.replaceChildren(...kids);
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function draw(s) {
  $("address").textContent = s.address || "";
  $("uptime").textContent = fmtUptime(s.uptime_s);
  const t = s.totals || {};
  $("total-submitted").textContent = fmtInt(t.submitted);
  $("total-done").textContent = fmtInt(t.done);
  $("total-failed").textContent = fmtInt(t.failed);
  $("total-restarts").textContent = fmtInt(t.restarts);
  const recent = (s.rates || []).slice(-5);
  const rate = recent.length ? recent.reduce((a, r) => a + r.done + r.failed, 0) / recent.length : 0;
  $("rate").textContent = fmtInt(Math.round(rate));
  const lat = s.latency_ms;
  $("latency").textContent = lat ? fmtMs(lat.p50) + " / " + fmtMs(lat.p99) : "-";
  $("clients").textContent = fmtInt((s.clients || []).length);
  $("shm").textContent = fmtBytes((s.shm || {}).bytes);
  drawChips(s.chips || [], s.queues || {});
  drawChart(s.rates || []);
  const most = Math.max(1, ...(s.clients || []).map((c) => c.unfinished));
  fill($("client-table").tBodies[0], (s.clients || []).map((c) => el("tr", { "data-client": c.client },
    el("td", {}, c.client), el("td", {}, c.pid),
    el("td", { class: "num" }, fmtInt(c.submitted)), el("td", { class: "num" }, fmtInt(c.done)),
    el("td", { class: "num" }, fmtInt(c.failed)), el("td", { class: "num" }, fmtInt(c.unfinished)),
    el("td", {}, el("div", { class: "bar", style: "width:" + (100 * c.unfinished / most) + "%" })))),
    "no clients connected", 7);
  fill($("failures").tBodies[0], (s.failures || []).map((f) => el("tr", {},
    el("td", {}, fmtTime(f.time)), el("td", {}, f.client), el("td", {}, f.task),
    el("td", { class: "kernel" }, f.kernel), el("td", {}, f.chip),
    el("td", { class: "reason", title: f.reason }, f.reason.split("\n")[0]))),
    "none", 6);
  fill($("deaths").tBodies[0], (s.deaths || []).map((d) => el("tr", {},
    el("td", {}, fmtTime(d.time)), el("td", {}, d.chip), el("td", {}, d.pid), el("td", {}, d.how))),
    "none", 4);
}

async function poll() {
  try {
    const r = await fetch("api/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    draw(await r.json());
    $("conn").textContent = "live";
    $("conn").className = "";
  } catch (e) {
    $("conn").textContent = "broker not answering";
    $("conn").className = "down";
  }
  setTimeout(poll, POLL_MS);
}

poll();
