"""The status page: one HTML document with inline CSS and JS (no CDN, no build step). The server
embeds the state at the time of the request, so the page is complete on first paint; the script
then polls `api/state` every 2 s and redraws. Every name shown comes from a stranger's record, so
the script only ever sets `textContent` and attributes, never HTML."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

POLL_MS = 2000

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>helix swarm</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #1d2330; background: #f7f8fa; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 18px 0 6px; }
.line { margin: 2px 0; } .muted { color: #6b7280; } .num { text-align: right; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; background: #fff; } th, td { padding: 3px 10px; border-bottom: 1px solid #e5e7eb; }
th { text-align: left; font-weight: 600; background: #eef0f4; }
svg { background: #fff; border: 1px solid #e5e7eb; }
.state-serving { color: #047857; } .state-loading, .state-joining { color: #b45309; } .state-leaving { color: #b91c1c; }
#status.bad { color: #b91c1c; }
</style></head>
<body>
<h1>helix swarm <span class="muted" id="model"></span></h1>
<div class="line" id="plan"></div>
<div class="line" id="rates"></div>
<div class="line muted" id="status"></div>
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>name</th><th>peer</th><th>GPU</th><th>state</th><th>layers</th>
<th class="num">load</th><th class="num">free KV</th><th class="num">capacity tok/s</th>
<th class="num">req/s</th><th class="num">tok/s</th></tr></thead><tbody></tbody></table>
<h2>Layer map</h2>
<svg id="layermap" width="960" height="60"></svg>
<h2>Flow graph <span class="muted">(tokens/s the plan routes over each edge)</span></h2>
<svg id="flows" width="960" height="200"></svg>
<script id="initial-state" type="application/json">__STATE__</script>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#dc2626"];
let polls = 0;
function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function fmt(x, digits) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits === undefined ? 1 : digits); }
function short(p) { return p.length <= 14 ? p : p.slice(0, 6) + ".." + p.slice(-6); }
function span(r) { return r ? "[" + r[0] + ", " + r[1] + ")" : "-"; }
function nameOf(s, peer) {
  if (peer === "source" || peer === "sink") return peer;
  const n = s.nodes.find(x => x.peer_id === peer);
  return n && n.name ? n.name : short(peer);
}
function colorOf(s, peer) { const i = s.nodes.findIndex(x => x.peer_id === peer); return COLORS[(i < 0 ? 0 : i) % COLORS.length]; }

function renderText(s) {
  document.getElementById("model").textContent = s.model ? "model " + s.model : "no model yet";
  const p = s.plan;
  document.getElementById("plan").textContent = p === null ? "plan: none yet (no plan from the elected planner)" :
    "plan: epoch " + p.epoch + " by " + nameOf(s, p.planner) + " (" + p.method + "), flow " +
    fmt(p.objective_tokens_per_s) + " tokens/s, bound " +
    (p.upper_bound_tokens_per_s === null ? "none" : fmt(p.upper_bound_tokens_per_s) + " tokens/s");
  document.getElementById("rates").textContent = s.nodes.length + " live node(s); " +
    fmt(s.requests_per_s, 2) + " requests/s, " + fmt(s.tokens_per_s) + " tokens/s";
}

function renderNodes(s) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const n of s.nodes) {
    const tr = el("tr", {"data-peer": n.peer_id});
    const cells = [[n.name || "-"], [short(n.peer_id)], [n.gpu], [n.state, "state-" + n.state], [span(n.layers)],
      [fmt(n.load, 0), "num"], [n.free_kv_tokens, "num"], [fmt(n.tokens_per_s), "num"],
      [fmt(n.requests_per_s, 2), "num"], [fmt(n.tokens_generated_per_s), "num"]];
    for (const [text, cls] of cells) tr.appendChild(el("td", cls ? {"class": cls} : {}, text));
    body.appendChild(tr);
  }
}

function renderLayerMap(s) {
  const svg = document.getElementById("layermap"), W = 960, left = 170, right = W - 20, row = 28, top = 26;
  const L = Math.max(1, s.num_layers), x = l => left + (right - left) * l / L;
  svg.replaceChildren();
  svg.setAttribute("height", top + row * Math.max(1, s.layer_map.length) + 8);
  const step = Math.max(1, Math.ceil(L / 32));
  for (let l = 0; l <= L; l += step) {
    svg.appendChild(el("svg:line", {x1: x(l), x2: x(l), y1: top - 4, y2: top + row * s.layer_map.length, stroke: "#e5e7eb"}));
    svg.appendChild(el("svg:text", {x: x(l), y: top - 8, "text-anchor": "middle", "font-size": 11, fill: "#6b7280"}, l));
  }
  if (s.layer_map.length === 0) {
    svg.appendChild(el("svg:text", {x: left, y: top + 18, fill: "#6b7280"}, "no node holds layers yet"));
  }
  s.layer_map.forEach((m, i) => {
    const y = top + i * row, g = el("svg:g", {"class": "layer-row", "data-peer": m.peer_id});
    g.appendChild(el("svg:text", {x: 8, y: y + 18, "font-size": 13}, m.name || short(m.peer_id)));
    g.appendChild(el("svg:rect", {x: left, y: y + 4, width: right - left, height: row - 8, fill: "#f3f4f6"}));
    if (m.planned && (!m.layers || m.planned[0] !== m.layers[0] || m.planned[1] !== m.layers[1])) {
      g.appendChild(el("svg:rect", {x: x(m.planned[0]), y: y + 3, width: x(m.planned[1]) - x(m.planned[0]),
        height: row - 6, fill: "none", stroke: "#6b7280", "stroke-dasharray": "4 3"}));
    }
    if (m.layers) {
      g.appendChild(el("svg:rect", {"class": "held", x: x(m.layers[0]), y: y + 5, width: x(m.layers[1]) - x(m.layers[0]),
        height: row - 10, rx: 3, fill: colorOf(s, m.peer_id)}));
      g.appendChild(el("svg:text", {x: x(m.layers[0]) + 6, y: y + 18, "font-size": 11, fill: "#fff"}, span(m.layers)));
    }
    svg.appendChild(g);
  });
}

function renderFlows(s) {
  const svg = document.getElementById("flows"), W = 960, H = 220;
  svg.replaceChildren();
  svg.setAttribute("height", H);
  const p = s.plan;
  if (!p || p.flows.length === 0) {
    svg.appendChild(el("svg:text", {x: 20, y: 30, fill: "#6b7280"}, "no plan yet"));
    return;
  }
  const defs = el("svg:defs");
  const marker = el("svg:marker", {id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 9, markerHeight: 9,
    markerUnits: "userSpaceOnUse", orient: "auto"});
  marker.appendChild(el("svg:path", {d: "M0,0 L10,5 L0,10 z", fill: "#9ca3af"}));
  defs.appendChild(marker);
  svg.appendChild(defs);
  // columns by first layer held: source left, sink right, every node at its place on the layer axis
  const L = Math.max(1, p.num_layers), pos = {source: [40, H / 2], sink: [W - 40, H / 2]};
  const columns = {};
  for (const [peer, r] of Object.entries(p.placement)) (columns[r[0]] = columns[r[0]] || []).push(peer);
  for (const [start, peers] of Object.entries(columns)) {
    peers.sort();
    peers.forEach((peer, i) => { pos[peer] = [120 + (W - 240) * Number(start) / L, H * (i + 1) / (peers.length + 1)]; });
  }
  const most = Math.max(...p.flows.map(e => e.tokens_per_s), 1e-9);
  for (const e of p.flows) {
    const a = pos[e.src], b = pos[e.dst];
    if (!a || !b) continue;
    const dx = b[0] - a[0], dy = b[1] - a[1], d = Math.max(1, Math.hypot(dx, dy)), r = 16;
    svg.appendChild(el("svg:line", {"class": "edge", x1: a[0] + dx * r / d, y1: a[1] + dy * r / d, x2: b[0] - dx * r / d,
      y2: b[1] - dy * r / d, stroke: "#9ca3af", "stroke-width": 1 + 5 * e.tokens_per_s / most, "marker-end": "url(#arrow)"}));
    svg.appendChild(el("svg:text", {"class": "edge-flow", x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4,
      "text-anchor": "middle", "font-size": 11, fill: "#374151"}, fmt(e.tokens_per_s)));
  }
  for (const [peer, [px, py]] of Object.entries(pos)) {
    const end = peer === "source" || peer === "sink";
    svg.appendChild(el("svg:circle", {cx: px, cy: py, r: 16, fill: end ? "#e5e7eb" : colorOf(s, peer)}));
    svg.appendChild(el("svg:text", {"class": "flow-node", x: px, y: py + 30, "text-anchor": "middle", "font-size": 12}, nameOf(s, peer)));
  }
}

function render(s) {
  renderText(s); renderNodes(s); renderLayerMap(s); renderFlows(s);
  document.body.setAttribute("data-epoch", s.plan ? s.plan.epoch : "");
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("api/state", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    polls += 1;
    document.body.setAttribute("data-polls", polls);
    status.className = ""; status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.className = "bad"; status.textContent = "cannot reach the server: " + err.message;
  }
  setTimeout(poll, __POLL_MS__);
}

render(JSON.parse(document.getElementById("initial-state").textContent));
poll();
</script>
</body></html>
"""


def render_page(state: Mapping[str, Any]) -> str:
    # "<" escaped so that no string in the state can close the script element
    embedded = json.dumps(state).replace("<", "\\u003c")
    return _PAGE.replace("__STATE__", embedded).replace("__POLL_MS__", str(POLL_MS))
