// gpu-router dashboard: polls GET /v1/dashboard every 2 s and draws SVG charts itself
// (no libraries, no network beyond the control plane). The JSON shape is
// control_plane/dashboard/data.py's dashboard_data().
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#4e9cf5", "#f5a623", "#7ed321", "#bd10e0", "#50e3c2", "#e94b77",
  "#b8e986", "#9013fe"];

function colorOf(providers, provider) {
  const index = providers.indexOf(provider);
  return PALETTE[(index < 0 ? 0 : index) % PALETTE.length];
}

function svg(tag, attributes, parent) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (parent) parent.appendChild(node);
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function fmtMs(value) {
  return value === null || value === undefined ? "-" : value.toFixed(1);
}

function fmtUsd(value) {
  if (value === null || value === undefined) return "-";
  if (value === 0) return "0";
  return value < 0.01 ? value.toExponential(2) : value.toFixed(4);
}

function fmtTime(unixMs) {
  return new Date(unixMs).toISOString().slice(11, 19);
}

// A time-series plot: each line is {provider, series, points: [[t, y], ...]}.
function drawLines(root, lines, options) {
  clear(root);
  const width = 560, height = options.height || 240;
  const left = 48, right = 10, top = 10, bottom = 24;
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const all = lines.flatMap((line) => line.points);
  if (all.length === 0) {
    svg("text", {x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty"}, root)
      .textContent = "no data yet";
    return;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
  const yMax = options.yMax !== undefined ? options.yMax
    : Math.max(...all.map((p) => p[1]), 1e-9) * 1.1;
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
  const y = (v) => top + (1 - v / yMax) * (height - top - bottom);
  for (let i = 0; i <= 4; i += 1) {
    const value = (yMax * i) / 4;
    svg("line", {x1: left, x2: width - right, y1: y(value), y2: y(value), class: "grid"}, root);
    svg("text", {x: left - 4, y: y(value) + 3, "text-anchor": "end"}, root)
      .textContent = options.format(value);
  }
  svg("text", {x: left, y: height - 6}, root).textContent = fmtTime(t0);
  svg("text", {x: width - right, y: height - 6, "text-anchor": "end"}, root)
    .textContent = fmtTime(t1);
  for (const line of lines) {
    if (line.points.length === 0) continue;
    const d = line.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`)
      .join(" ");
    svg("path", {d, class: `line ${line.series}`, stroke: line.color,
      "data-provider": line.provider, "data-series": line.series}, root);
    for (const p of line.points) {
      svg("circle", {cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 2, fill: line.color,
        "data-provider": line.provider, "data-series": line.series}, root);
    }
  }
}

function pointsOf(series, field) {
  return series.filter((p) => p[field] !== null).map((p) => [p.start_unix_ms, p[field]]);
}

function drawLatency(data) {
  const root = document.getElementById("latency");
  clear(root);
  if (data.providers.length === 0) {
    root.innerHTML = '<p class="empty">no requests yet</p>';
    return;
  }
  for (const provider of data.providers) {
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    const color = colorOf(data.providers, provider);
    caption.innerHTML = `<strong>${escapeHtml(provider)}</strong><span class="legend">` +
      `<span style="background:${color}"></span>total p50` +
      `<span style="background:${color};opacity:.5"></span>ttfb p50 (dashed)</span>`;
    figure.appendChild(caption);
    const chart = svg("svg", {class: "chart", role: "img",
      "aria-label": `latency of ${provider}`, "data-provider": provider});
    figure.appendChild(chart);
    root.appendChild(figure);
    const series = data.series[provider] || [];
    drawLines(chart, [
      {provider, series: "total", color, points: pointsOf(series, "total_p50_ms")},
      {provider, series: "ttfb", color, points: pointsOf(series, "ttfb_p50_ms")},
    ], {height: 160, format: (v) => `${v.toFixed(0)} ms`});
  }
}

function drawCost(data) {
  const root = document.getElementById("cost");
  clear(root);
  const width = 560, height = 240, left = 90, right = 70, top = 10;
  const rows = data.providers.map((provider) => [provider,
    (data.totals[provider] || {}).cost_per_request_usd]).filter((row) => row[1] !== null);
  if (rows.length === 0) {
    svg("text", {x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty"}, root)
      .textContent = "no data yet";
    return;
  }
  const max = Math.max(...rows.map((row) => row[1]), 1e-12);
  const band = Math.min(36, (height - top * 2) / rows.length);
  rows.forEach(([provider, value], i) => {
    const barY = top + i * band;
    const barWidth = Math.max((value / max) * (width - left - right), 1);
    svg("text", {x: left - 6, y: barY + band / 2 + 3, "text-anchor": "end"}, root)
      .textContent = provider;
    svg("rect", {x: left, y: barY + 3, width: barWidth.toFixed(1), height: band - 6,
      fill: colorOf(data.providers, provider), "data-provider": provider,
      "data-value": value}, root);
    svg("text", {x: left + barWidth + 4, y: barY + band / 2 + 3}, root)
      .textContent = `$${fmtUsd(value)}`;
  });
}

function drawSuccess(data) {
  const lines = data.providers.map((provider) => ({
    provider, series: "success", color: colorOf(data.providers, provider),
    points: pointsOf(data.series[provider] || [], "success_rate").map((p) => [p[0], p[1] * 100]),
  }));
  drawLines(document.getElementById("success"), lines,
    {yMax: 100, format: (v) => `${v.toFixed(0)}%`});
}

function drawTiles(data) {
  const root = document.getElementById("tiles");
  clear(root);
  for (const provider of data.providers) {
    const total = data.totals[provider];
    const tile = document.createElement("div");
    tile.className = "tile";
    tile.dataset.provider = provider;
    tile.style.setProperty("--tile-color", colorOf(data.providers, provider));
    const success = total.success_rate === null ? "-" : `${(total.success_rate * 100).toFixed(1)}%`;
    tile.innerHTML = `<div class="name">${escapeHtml(provider)}</div><div class="figures">` +
      `${total.requests} requests &middot; ${success} ok<br>` +
      `$${fmtUsd(total.cost_usd)} spent &middot; $${fmtUsd(total.cost_per_request_usd)}/req</div>`;
    root.appendChild(tile);
  }
  if (data.unrouted && data.unrouted.requests > 0) {  // refused at the edge, /v1/models: no provider's
    const tile = document.createElement("div");
    tile.className = "tile unrouted";
    tile.innerHTML = `<div class="name">not routed</div><div class="figures">` +
      `${data.unrouted.requests} requests never reached a provider</div>`;
    root.appendChild(tile);
  }
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;"}[c]));
}

function drawDecisions(data) {
  const body = document.querySelector("#decisions tbody");
  clear(body);
  for (const d of data.decisions) {
    const row = document.createElement("tr");
    row.dataset.requestId = d.request_id;
    if (d.status === 0 || d.status === 429 || d.status >= 500) row.className = "error";
    const cells = [
      [fmtTime(d.at_unix_ms)], [d.request_id, "", `/v1/why/${encodeURIComponent(d.request_id)}`],
      [d.model], [`${d.policy} / ${d.strategy}`],
      [d.reason, "reason"], [d.fallbacks.join(", ") || "-"], [d.provider || "not routed"],
      [String(d.attempts), "num"], [String(d.status), "num"], [fmtMs(d.ttfb_ms), "num"],
      [fmtMs(d.total_ms), "num"], [fmtUsd(d.cost_usd), "num"],
    ];
    for (const [text, cls, href] of cells) {
      const cell = document.createElement("td");
      if (href) {  // the request's story (gpu-router why) from the control plane's ledger
        const link = cell.appendChild(document.createElement("a"));
        link.href = href;
        link.textContent = text;
      } else {
        cell.textContent = text;
      }
      if (cls) cell.className = cls;
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
}

function drawSavings(data) {  // gpu-router savings over the last day, refreshed every minute
  const savings = data.savings;
  if (!savings) return;
  const pct = (b) => (b && b.savings_pct !== null) ? `${(b.savings_pct * 100).toFixed(1)}%` : "-";
  const vs = (name, b) => b ? `${name}: $${fmtUsd(b.cost_usd)}, saved $${fmtUsd(b.savings_usd)} ` +
    `(${pct(b)})` : `${name}: -`;
  document.getElementById("savings-summary").textContent =
    `served ${savings.requests} requests for $${fmtUsd(savings.actual_usd)}; ` +
    `${vs("vs cheapest single provider per model", savings.vs_cheapest)}; ` +
    `${vs("vs most used", savings.vs_most_used)}; ${savings.failed_over} failed over; ` +
    `${savings.unrouted} never reached a provider`;
  const body = document.querySelector("#savings tbody");
  clear(body);
  for (const m of savings.models) {
    const row = body.appendChild(document.createElement("tr"));
    for (const [text, cls] of [[m.model], [String(m.requests), "num"],
        [fmtUsd(m.actual_usd), "num"], [m.cheapest || "-"],
        [m.cheapest_usd === null ? "-" : fmtUsd(m.cheapest_usd), "num"]]) {
      const cell = row.appendChild(document.createElement("td"));
      cell.textContent = text;
      if (cls) cell.className = cls;
    }
  }
}

function drawClients(data) {
  const body = document.querySelector("#clients tbody");
  clear(body);
  for (const c of data.clients || []) {
    const row = document.createElement("tr");
    row.dataset.client = c.client;
    if (c.remaining_usd === 0) row.className = "error";
    const cells = [
      [c.client], [String(c.requests), "num"], [String(c.errors), "num"],
      [String(c.tokens), "num"], [fmtUsd(c.cost_usd), "num"], [fmtUsd(c.budget_usd), "num"],
      [fmtUsd(c.spent_usd), "num"], [fmtUsd(c.remaining_usd), "num"],
    ];
    for (const [text, cls] of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (cls) cell.className = cls;
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
}

function render(data) {
  drawTiles(data);
  drawLatency(data);
  drawCost(data);
  drawSuccess(data);
  drawDecisions(data);
  drawSavings(data);
  drawClients(data);
  const status = document.getElementById("status");
  status.textContent = `updated ${fmtTime(data.now_unix_ms)} UTC`;
  status.className = "status";
}

async function poll() {
  try {
    // From the origin: a page opened with credentials in its URL (user:token@host) has them
    // in its base URL, which fetch refuses; the browser sends the ones it was given anyway.
    const response = await fetch(new URL("/v1/dashboard", location.origin), {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (error) {
    const status = document.getElementById("status");
    status.textContent = `cannot load /v1/dashboard: ${error.message}`;
    status.className = "status stale";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
