// Monitoring dashboards: adoption and latency, drawn with uPlot (vendor/uPlot.iife.min.js, MIT,
// loaded by index.html as a same-origin script; it defines the global `uPlot`).
//
// Three tabs, by role: "My offerings" (provider: adoption per day, mode mix, revenue, latency
// p50/p95/p99 per mode), "My contracts" (consumer: usage and latency per contract), "Marketplace"
// (compliance: usage by mode, latency by mode, offerings). Data comes from /v1/monitoring/*; the
// view refreshes every REFRESH_MS without reloading the page. Every chart is kept in
// window.somMonitoring.charts (id -> {chart, data, source}) so tests can read what was drawn.

export const REFRESH_MS = 5000;

const COLORS = ["#2557d6", "#d6336c", "#1d7a46", "#e8890c", "#7048e8", "#0c8599", "#868e96"];
const RANGES = {
  "1h": { step: "minute", seconds: 3600, label: "last hour (minutes)" },
  "24h": { step: "minute", seconds: 86400, label: "last 24 h (minutes)" },
  "7d": { step: "hour", seconds: 7 * 86400, label: "last 7 days (hours)" },
  "30d": { step: "day", seconds: 30 * 86400, label: "last 30 days (days)" },
};

const state = (window.somMonitoring = window.somMonitoring ?? {
  charts: new Map(),
  drawMs: {},
  refreshes: 0,
  timer: null,
  lastBuildMs: null,
});

// -- formatting --------------------------------------------------------------------------------

export function fmtDuration(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(2)} s`;
}

function fmtCount(n) {
  return new Intl.NumberFormat().format(n ?? 0);
}

function fmtMoneyMap(rev) {
  const parts = Object.entries(rev ?? {}).map(([cur, minor]) => {
    try {
      const f = new Intl.NumberFormat(undefined, { style: "currency", currency: cur });
      return f.format(minor / 10 ** f.resolvedOptions().maximumFractionDigits);
    } catch {
      return `${minor} ${cur}`;
    }
  });
  return parts.length ? parts.join(" + ") : "0";
}

// -- charts ------------------------------------------------------------------------------------

// The API lists only buckets with data; a chart shows every bucket of the window: counts are 0
// where there was nothing, durations are gaps (null).
export function dense(spec, fill) {
  const { start, end, step } = spec.window;
  const n = Math.max(0, Math.round((end - start) / step));
  const t = new Array(n);
  for (let i = 0; i < n; i++) t[i] = start + i * step;
  const cols = spec.series.map(() => new Array(n).fill(fill));
  spec.t.forEach((x, j) => {
    const i = Math.round((x - start) / step);
    if (i >= 0 && i < n)
      spec.series.forEach((s, k) => {
        cols[k][i] = s.values[j];
      });
  });
  return [t, ...cols];
}

function windowOf(report) {
  return { start: Date.parse(report.from) / 1000, end: Date.parse(report.to) / 1000, step: report.step_seconds };
}

// Build (or, if `id` is already drawn in `el`, update) one time-series chart.
// spec: {id, title, series: [{label, values, kind?: "count"|"duration"|"money"}], t: [unix seconds]}
// uPlot draws in a microtask after construction or setData: the time from the call to the end of
// that first draw is kept as window.somMonitoring.drawMs[id] (what the bench reports).
export function chart(el, spec) {
  const kind = spec.series[0]?.kind ?? "count";
  const data = spec.window
    ? dense(spec, kind === "duration" ? null : 0)
    : [spec.t, ...spec.series.map((s) => s.values)];
  const t0 = performance.now();
  const prev = state.charts.get(spec.id);
  if (prev && prev.el === el && prev.labels === spec.series.map((s) => s.label).join("|") && el.isConnected) {
    prev.t0 = t0;
    prev.chart.setData(data);
    prev.data = data;
  } else {
    if (prev) prev.chart.destroy();
    el.replaceChildren();
    const fmt = kind === "duration" ? fmtDuration : (v) => (v === null || v === undefined ? "–" : fmtCount(v));
    const opts = {
      title: spec.title,
      width: Math.max(320, Math.floor(el.clientWidth || 560)),
      height: spec.height ?? 220,
      scales: {
        x: spec.window ? { time: true, range: [spec.window.start, spec.window.end] } : { time: true },
        y: {
          range: (u, lo, hi) => [
            0,
            kind === "duration" ? Math.max(1e-4, (hi ?? 0) * 1.15) : Math.max(1, Math.ceil((hi ?? 0) * 1.15)),
          ],
        },
      },
      series: [
        {},
        ...spec.series.map((s, i) => ({
          label: s.label,
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: false,
          fill: kind === "duration" ? undefined : `${COLORS[i % COLORS.length]}18`,
          points: { show: (kind === "duration" ? spec.t.length : data[0].length) < 200, size: 5 },
          value: (u, v) => fmt(v),
        })),
      ],
      axes: [{}, { values: (u, vals) => vals.map(fmt), size: 76 }],
      legend: { live: true },
      hooks: {
        draw: [
          () => {
            const entry = state.charts.get(spec.id);
            if (entry && entry.t0 !== null) {
              state.drawMs[spec.id] = performance.now() - entry.t0;
              entry.t0 = null;
            }
          },
        ],
      },
    };
    state.charts.set(spec.id, {
      chart: null,
      el,
      data,
      labels: spec.series.map((s) => s.label).join("|"),
      source: spec,
      t0,
    });
    state.charts.get(spec.id).chart = new uPlot(opts, data, el);
  }
  const ms = performance.now() - t0;
  state.lastBuildMs = ms;
  return ms;
}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function tiles(items) {
  return h(
    "div",
    { class: "kpis" },
    items.map(([label, value, id]) =>
      h("div", { class: "kpi" }, h("span", { class: "kpi-label" }, label), h("strong", { "data-kpi": id }, value)),
    ),
  );
}

function box(id) {
  return h("div", { class: "chart", id: `chart-${id}` });
}

function latencySpecs(prefix, latency, window) {
  return Object.entries(latency.by_mode ?? {}).map(([mode, s]) => ({
    id: `${prefix}-latency-${mode}`,
    window,
    title: `Latency, ${mode} (p50 / p95 / p99)`,
    t: s.t,
    series: [
      { label: "p50", values: s.p50, kind: "duration" },
      { label: "p95", values: s.p95, kind: "duration" },
      { label: "p99", values: s.p99, kind: "duration" },
    ],
  }));
}

function modeMix(id, title, a, window) {
  return {
    id,
    title,
    t: a.t,
    window,
    series: Object.entries(a.calls_by_mode ?? {}).map(([m, v]) => ({ label: m, values: v })),
  };
}

function revenueSpec(id, a, window) {
  const cur = Object.keys(a.revenue ?? {});
  return {
    id,
    window,
    title: `Revenue per bucket (minor units${cur.length ? `, ${cur.join(", ")}` : ""})`,
    t: a.t,
    series: cur.length
      ? cur.map((c) => ({ label: c, values: a.revenue[c] }))
      : [{ label: "revenue", values: a.t.map(() => 0) }],
  };
}

// -- the three tabs ----------------------------------------------------------------------------

async function providerTab(api, q, win, body) {
  const list = await api("/v1/monitoring/offerings", {
    params: { step: "day", from: new Date(Date.now() - 30 * 86400e3).toISOString() },
  });
  if (!list.offerings.length) return [h("p", { class: "empty" }, "You have no offerings.")];
  const id = list.offerings.some((o) => o.offering_id === q.offering) ? q.offering : list.offerings[0].offering_id;
  const [rep, daily] = await Promise.all([
    api(`/v1/monitoring/offerings/${encodeURIComponent(id)}`, { params: win }),
    api(`/v1/monitoring/offerings/${encodeURIComponent(id)}`, {
      params: { step: "day", from: new Date(Date.now() - 30 * 86400e3).toISOString() },
    }),
  ]);
  const tot = rep.totals;
  const specs = [
    {
      id: "provider-adoption",
      title: "Adoption per day: calls, consumers, contracts (30 days)",
      t: daily.adoption.t,
      window: windowOf(daily),
      series: [
        { label: "calls", values: daily.adoption.calls },
        { label: "consumers", values: daily.adoption.consumers },
        { label: "contracts", values: daily.adoption.contracts },
      ],
    },
    modeMix("provider-modes", "Mode mix: calls per mode", rep.adoption, windowOf(rep)),
    revenueSpec("provider-revenue", rep.adoption, windowOf(rep)),
    {
      id: "provider-units",
      title: "Units per bucket",
      t: rep.adoption.t,
      window: windowOf(rep),
      series: [{ label: "units", values: rep.adoption.units }],
    },
    ...latencySpecs("provider", rep.latency, windowOf(rep)),
  ];
  const select = h(
    "select",
    { name: "offering", id: "monitor-offering" },
    list.offerings.map((o) =>
      h("option", { value: o.offering_id, selected: o.offering_id === id }, `${o.name} (${o.offering_id})`),
    ),
  );
  select.addEventListener("change", () => body.go({ ...q, offering: select.value }));
  return {
    nodes: [
      h("div", { class: "filters" }, h("label", { class: "field" }, h("span", {}, "Offering"), select)),
      tiles([
        ["Calls", fmtCount(tot.calls), "calls"],
        ["Units", fmtCount(tot.units), "units"],
        ["Consumers", fmtCount(tot.consumers), "consumers"],
        ["Active contracts", fmtCount(rep.active_contracts), "active_contracts"],
        ["Revenue", fmtMoneyMap(tot.revenue), "revenue"],
        ["Errors", fmtCount(Object.values(rep.latency.errors_by_class ?? {}).reduce((a, b) => a + b, 0)), "errors"],
      ]),
      h(
        "p",
        { class: "muted proof" },
        `From ${fmtCount(tot.leaf_count)} charged usage leaves of the ledger`,
        rep.adoption.leaves.first.length
          ? ` (indexes ${Math.min(...rep.adoption.leaves.first)}–${Math.max(...rep.adoption.leaves.last)})`
          : "",
        ". Each bucket lists the leaves it summarises; check them against the ledger export.",
      ),
    ],
    specs,
    report: rep,
  };
}

async function consumerTab(api, q, win) {
  const rep = await api("/v1/monitoring/contracts", { params: win });
  if (!rep.contracts.length)
    return { nodes: [h("p", { class: "empty" }, "You have no contracts.")], specs: [], report: rep };
  const specs = [];
  const rows = [];
  for (const c of rep.contracts) {
    specs.push({
      id: `consumer-usage-${c.contract_id}`,
      title: `${c.offering_name}: calls and units (${c.contract_id})`,
      t: c.series.t,
      window: windowOf(rep),
      series: [
        { label: "calls", values: c.series.calls },
        { label: "units", values: c.series.units },
      ],
    });
    specs.push({
      id: `consumer-latency-${c.contract_id}`,
      title: `${c.offering_name}: latency (p50 / p95 / p99)`,
      t: c.series.t,
      window: windowOf(rep),
      series: [
        { label: "p50", values: c.series.p50, kind: "duration" },
        { label: "p95", values: c.series.p95, kind: "duration" },
        { label: "p99", values: c.series.p99, kind: "duration" },
      ],
    });
    rows.push(
      h(
        "tr",
        { "data-contract": c.contract_id },
        h("td", {}, h("code", {}, c.contract_id)),
        h("td", {}, c.offering_name),
        h("td", {}, c.status),
        h("td", { class: "num" }, fmtCount(c.totals.calls)),
        h("td", { class: "num" }, fmtCount(c.totals.units)),
        h("td", { class: "num" }, fmtCount(c.totals.spend)),
      ),
    );
  }
  const table = h(
    "table",
    { class: "monitor-contracts" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Contract", "Offering", "Status", "Calls", "Units", "Spend (minor)"].map((t) => h("th", { scope: "col" }, t)),
      ),
    ),
    h("tbody", {}, rows),
  );
  return { nodes: [table], specs, report: rep };
}

async function marketplaceTab(api, q, win) {
  const rep = await api("/v1/monitoring/marketplace", { params: win });
  const tot = rep.totals;
  const specs = [
    modeMix("market-modes", "Calls per mode (marketplace)", rep.adoption, windowOf(rep)),
    {
      id: "market-usage",
      title: "Units and consumers (marketplace)",
      t: rep.adoption.t,
      window: windowOf(rep),
      series: [
        { label: "units", values: rep.adoption.units },
        { label: "consumers", values: rep.adoption.consumers },
      ],
    },
    ...latencySpecs("market", rep.latency, windowOf(rep)),
  ];
  const rows = rep.offerings.map((o) =>
    h(
      "tr",
      { "data-offering": o.offering_id },
      h("td", {}, o.name),
      h("td", {}, h("code", {}, o.offering_id)),
      h("td", { class: "num" }, fmtCount(o.calls)),
      h("td", { class: "num" }, fmtCount(o.units)),
      h("td", { class: "num" }, fmtCount(o.consumers)),
      h("td", {}, fmtMoneyMap(o.revenue)),
    ),
  );
  return {
    nodes: [
      tiles([
        ["Calls", fmtCount(tot.calls), "calls"],
        ["Units", fmtCount(tot.units), "units"],
        ["Consumers", fmtCount(tot.consumers), "consumers"],
        ["Contracts", fmtCount(tot.contracts), "contracts"],
        ["Revenue", fmtMoneyMap(tot.revenue), "revenue"],
      ]),
      rows.length
        ? h(
            "table",
            { class: "monitor-offerings" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["Offering", "Id", "Calls", "Units", "Consumers", "Revenue"].map((t) => h("th", { scope: "col" }, t)),
              ),
            ),
            h("tbody", {}, rows),
          )
        : h("p", { class: "empty" }, "No usage in this range."),
    ],
    specs,
    report: rep,
  };
}

// -- the view ----------------------------------------------------------------------------------

function stopRefresh() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

// ctx: {api, roles, go(params)} from app.js. Returns the nodes of the view.
export async function monitoringView(params, ctx) {
  stopRefresh();
  const q = Object.fromEntries(params);
  const tabs = [];
  if (ctx.roles.some((r) => r === "provider" || r === "admin")) tabs.push(["provider", "My offerings", providerTab]);
  if (ctx.roles.some((r) => r === "consumer" || r === "admin")) tabs.push(["consumer", "My contracts", consumerTab]);
  if (ctx.roles.some((r) => r === "compliance" || r === "admin"))
    tabs.push(["marketplace", "Marketplace", marketplaceTab]);
  if (!tabs.length)
    return [h("h2", {}, "Monitoring"), h("p", { class: "empty" }, "Your roles have no monitoring view.")];
  const tab = tabs.find(([k]) => k === q.tab) ?? tabs[0];
  const range = RANGES[q.range] ? q.range : "24h";
  const winFor = () => ({
    step: RANGES[range].step,
    from: new Date(Date.now() - RANGES[range].seconds * 1000).toISOString(),
  });
  const body = { go: (p) => ctx.go({ ...p, tab: tab[0], range }) };
  const status = h("span", { class: "muted", id: "monitor-updated" }, "");
  const content = h("div", { id: "monitor-content" });
  const charts = h("div", { class: "charts", id: "monitor-charts" });

  const draw = async (first) => {
    const out = await tab[2](ctx.api, q, winFor(), body);
    const res = Array.isArray(out) ? { nodes: out, specs: [] } : out;
    if (!first && !charts.isConnected) return false;
    content.replaceChildren(...res.nodes);
    const have = new Set(res.specs.map((s) => s.id));
    for (const [id, c] of state.charts) {
      if (!have.has(id) || !c.el.isConnected) {
        c.chart.destroy();
        state.charts.delete(id);
      }
    }
    for (const spec of res.specs) {
      let el = charts.querySelector(`#chart-${CSS.escape(spec.id)}`);
      if (!el) {
        el = box(spec.id);
        charts.append(el);
      }
    }
    for (const el of [...charts.children]) if (!have.has(el.id.slice("chart-".length))) el.remove();
    state.report = res.report;
    state.pending = res.specs;
    if (charts.isConnected)
      for (const spec of res.specs) chart(charts.querySelector(`#chart-${CSS.escape(spec.id)}`), spec);
    state.refreshes += 1;
    state.updatedAt = new Date().toISOString();
    status.textContent = `updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`;
    return true;
  };

  for (const [, c] of state.charts) c.chart.destroy();
  state.charts.clear();
  await draw(true);
  state.timer = setInterval(async () => {
    if (!charts.isConnected) {
      stopRefresh();
      return;
    }
    try {
      await draw(false);
    } catch (e) {
      status.textContent = `refresh failed: ${e.message}`;
    }
  }, REFRESH_MS);
  // The charts need their container's width: draw them once the view is in the document.
  requestAnimationFrame(() => {
    for (const spec of state.pending ?? []) {
      const el = charts.querySelector(`#chart-${CSS.escape(spec.id)}`);
      if (el && !state.charts.has(spec.id)) chart(el, spec);
    }
  });
  const rangeSel = h(
    "select",
    { name: "range", id: "monitor-range" },
    Object.entries(RANGES).map(([k, r]) => h("option", { value: k, selected: k === range }, r.label)),
  );
  rangeSel.addEventListener("change", () => ctx.go({ ...q, tab: tab[0], range: rangeSel.value }));
  return [
    h("h2", {}, "Monitoring"),
    tabs.length > 1
      ? h(
          "div",
          { class: "tabs", role: "tablist" },
          tabs.map(([k, label]) =>
            h(
              "a",
              { href: `#/monitoring?tab=${k}&range=${range}`, role: "tab", "aria-selected": String(k === tab[0]) },
              label,
            ),
          ),
        )
      : null,
    h("div", { class: "filters" }, h("label", { class: "field" }, h("span", {}, "Range"), rangeSel), status),
    content,
    charts,
  ];
}
