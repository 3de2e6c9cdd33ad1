// The Share-of-Model web UI: a client of the /v1 API, like the SDK.
//
// Two ways in. SSO (docs/sso.md): the server's HttpOnly session cookie, sent only to this origin
// (credentials "same-origin"), with the session's CSRF token (from /v1/auth/me, kept in memory)
// on every state-changing request. Or an API key: entered once, kept in sessionStorage (gone when
// the tab closes), sent only as "Authorization: Bearer ..." (cookies omitted) and never put in a URL. Every node is built with the DOM API
// (h() below, textContent); nothing is ever assigned to innerHTML. API errors are shown as the
// message of their JSON body, {"error": {"code", "message"}}.

import { accessPanel, newOfferingPanel, teamsView, uploadPanel, validationPanel } from "./access.js";
import { renderMarkdown } from "./md.js";
import {
  b64decode,
  parseCheckpoint,
  parseVkey,
  sameVkey,
  verifyInclusion,
  verifyNoteSignature,
  vkeyFingerprint,
} from "./merkle.js";
import { monitoringView } from "./monitor.js";

const KEY = "som.apiKey";
const PAGE = 20;
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const banner = document.getElementById("message");
let me = null;
let renderSeq = 0;
let sso = null; // {csrf} while signed in with the session cookie
let ssoAvailable = false;

// -- helpers ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
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

function flash(text, kind = "error") {
  banner.replaceChildren();
  if (!text) {
    banner.hidden = true;
    return;
  }
  banner.className = `message ${kind}`;
  banner.append(
    h("span", {}, text),
    h("button", { class: "link", type: "button", "aria-label": "Dismiss", onclick: () => flash("") }, "×"),
  );
  banner.hidden = false;
}

async function api(path, { method = "GET", params, accept = "application/json", raw = false, body } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params ?? {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
  }
  const headers = { Accept: accept };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  else if (sso && method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = sso.csrf;
  if (body !== undefined)
    headers["Content-Type"] = body instanceof Blob ? "application/octet-stream" : "application/json";
  let r;
  try {
    r = await fetch(url, {
      method,
      headers,
      cache: "no-store",
      credentials: key || !sso ? "omit" : "same-origin",
      body: body === undefined || body instanceof Blob ? body : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "network", `Cannot reach the marketplace: ${e.message}`);
  }
  if (!r.ok) {
    let code = "http_error";
    let message = `${r.status} ${r.statusText}`;
    try {
      const body = await r.json();
      if (body && body.error && body.error.message) ({ code, message } = body.error);
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(r.status, code, message);
  }
  return raw ? r : r.json();
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

function fmtBytes(n) {
  if (typeof n !== "number") return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function fmtMoney(minor, currency) {
  if (!currency) return String(minor);
  try {
    const f = new Intl.NumberFormat(undefined, { style: "currency", currency });
    return f.format(minor / 10 ** f.resolvedOptions().maximumFractionDigits);
  } catch {
    return `${minor} ${currency} (minor units)`;
  }
}

function short(s, n = 12) {
  s = String(s ?? "");
  return s.length > n + 1 ? `${s.slice(0, n)}…` : s;
}

function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}

function hashFor(view, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const qs = q.toString();
  return `#/${view}${qs ? `?${qs}` : ""}`;
}

function go(view, params) {
  location.hash = hashFor(view, params);
}

function pager(page, onGo) {
  const { total, offset, limit, next_offset: next } = page;
  const first = total ? offset + 1 : 0;
  const last = offset + page.items.length;
  return h(
    "nav",
    { class: "pager", "aria-label": "Pages" },
    h(
      "button",
      { type: "button", disabled: offset <= 0, onclick: () => onGo(Math.max(0, offset - limit)) },
      "← Previous",
    ),
    h("span", { class: "muted" }, `${first}–${last} of ${total}`),
    h("button", { type: "button", disabled: next === null || next === undefined, onclick: () => onGo(next) }, "Next →"),
  );
}

function table(headers, rows, cls = "") {
  return h(
    "table",
    { class: cls },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headers.map((t) => h("th", { scope: "col" }, t)),
      ),
    ),
    h("tbody", {}, rows),
  );
}

function field(label, control) {
  return h("label", { class: "field" }, h("span", {}, label), control);
}

function select(name, value, options) {
  return h(
    "select",
    { name },
    options.map(([v, t]) => h("option", { value: v, selected: v === (value ?? "") }, t)),
  );
}

function hasRole(...roles) {
  return !!me && roles.some((r) => me.roles.includes(r));
}

// datetime-local (local time, no zone) <-> ISO 8601 UTC for the API and the URL.
function toLocalInput(iso) {
  const d = new Date(iso);
  if (!iso || Number.isNaN(d.getTime())) return "";
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

function fromLocalInput(v) {
  if (!v) return "";
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

// -- sign in / out -----------------------------------------------------------------------------

function signInView(message) {
  nav.replaceChildren();
  who.replaceChildren();
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "som_…",
    required: true,
  });
  const err = h("p", { class: "error", id: "signin-error", role: "alert", hidden: !message }, message ?? "");
  const form = h(
    "form",
    { class: "signin panel", id: "signin" },
    h("h2", {}, "Sign in"),
    ssoAvailable
      ? h(
          "p",
          {},
          h(
            "a",
            {
              class: "button primary",
              id: "sso-login",
              href: `/v1/auth/login?next=${encodeURIComponent("/ui/" + (location.hash || ""))}`,
            },
            "Sign in with SSO",
          ),
        )
      : null,
    h(
      "p",
      { class: "muted" },
      "Paste your API key. It stays in this browser tab (session storage) and is sent only as an Authorization header.",
    ),
    field("API key", input),
    err,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    try {
      me = await api("/v1/whoami");
    } catch (e) {
      sessionStorage.removeItem(KEY);
      me = null;
      err.textContent = e.message;
      err.hidden = false;
      return;
    }
    input.value = "";
    renderChrome();
    if (!location.hash || location.hash === "#/" || location.hash === "#") go(defaultView());
    else render();
  });
  main.replaceChildren(form);
  input.focus();
}

async function signOut() {
  if (sso && !sessionStorage.getItem(KEY)) {
    try {
      await api("/v1/auth/logout", { method: "POST" });
    } catch (e) {
      flash(e.message);
    }
  }
  sso = null;
  sessionStorage.removeItem(KEY);
  me = null;
  flash("");
  history.replaceState(null, "", location.pathname);
  signInView();
}

function defaultView() {
  return "catalog";
}

function renderChrome() {
  const links = [["catalog", "Catalog"]];
  if (hasRole("consumer", "provider", "admin")) links.push(["contracts", "Contracts"], ["federations", "Federations"]);
  if (hasRole("compliance", "admin")) links.push(["audit", "Audit trail"], ["ledger", "Ledger"]);
  if (hasRole("consumer", "provider", "compliance", "admin")) links.push(["monitoring", "Monitoring"]);
  links.push(["teams", "Teams"]);
  links.push(["me", "Account"]);
  const current = location.hash.slice(2).split(/[/?]/)[0] || defaultView();
  nav.replaceChildren(
    ...links.map(([v, t]) =>
      h(
        "a",
        {
          href: `#/${v}`,
          "aria-current": current === v || (current === "offering" && v === "catalog") ? "page" : null,
        },
        t,
      ),
    ),
  );
  who.replaceChildren(
    h("span", { class: "org", title: me.org_id }, me.org_name),
    " ",
    ...me.roles.map((r) => badge(r, "role")),
    h("button", { type: "button", id: "sign-out", class: "secondary", onclick: signOut }, "Sign out"),
  );
}

// -- catalog ---------------------------------------------------------------------------------

async function catalogView(params) {
  const q = Object.fromEntries(params);
  const form = h(
    "form",
    { class: "filters", id: "catalog-filters", role: "search" },
    field("Search", h("input", { name: "q", type: "search", value: q.q ?? "", placeholder: "name or description" })),
    field("Task", h("input", { name: "task", value: q.task ?? "", placeholder: "e.g. binary-classification" })),
    field("Tag", h("input", { name: "tag", value: q.tag ?? "" })),
    field(
      "Hosting",
      select("hosting", q.hosting, [
        ["", "any"],
        ["marketplace", "marketplace"],
        ["provider", "provider"],
      ]),
    ),
    h("button", { type: "submit", class: "primary" }, "Search"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    go("catalog", Object.fromEntries(new FormData(form)));
  });
  const offset = Number(q.offset ?? 0) || 0;
  const page = await api("/v1/offerings", {
    params: { q: q.q, task: q.task, tag: q.tag, hosting: q.hosting, limit: PAGE, offset },
  });
  const items = page.items.map((o) =>
    h(
      "li",
      { class: "offering" },
      h("h3", {}, h("a", { href: `#/offering/${encodeURIComponent(o.id)}` }, o.name)),
      h("p", { class: "desc" }, short(o.description, 240)),
      h(
        "div",
        { class: "badges" },
        badge(o.task, "task"),
        badge(`${o.hosting}-hosted`),
        o.status !== "published" ? badge(o.status, "warn") : null,
        agentBadge(o),
        o.latest_version ? badge(`v${o.latest_version.number}`) : badge("no version", "warn"),
        o.latest_version && o.latest_version.he_report ? badge("HE-compiled", "ok") : null,
        o.tags.map((t) => badge(`#${t}`, "tag")),
      ),
    ),
  );
  return [
    h("h2", {}, "Catalog"),
    form,
    items.length
      ? h("ul", { class: "offerings", id: "offerings" }, items)
      : h("p", { class: "empty" }, "No offerings match."),
    pager(page, (off) => go("catalog", { ...q, offset: off })),
    hasRole("provider") ? newOfferingPanel(UI) : null,
  ];
}

function agentBadge(o) {
  if (o.hosting !== "provider") return null;
  if (o.agent_online === true) return badge("agent online", "ok agent");
  if (o.agent_online === false) return badge("agent offline", "bad agent");
  return badge("agent status unknown", "agent");
}

const HE_FIELDS = [
  ["Multiplicative depth", "depth"],
  ["Ring degree N", "poly_modulus_degree"],
  ["Coefficient moduli (bits)", "coeff_mod_bit_sizes", (v) => (Array.isArray(v) ? v.join(", ") : v)],
  ["Security", "security_bits", (v) => `${v} bits`],
  ["Agreement with plaintext model", "argmax_agreement", (v) => `${(100 * v).toFixed(2)} %`],
  ["Max |error| vs plaintext", "max_abs_error_vs_exact", (v) => Number(v).toExponential(2)],
  ["Promised output precision", "promised_precision", (v) => Number(v).toExponential(2)],
  ["Throughput", "throughput_samples_per_s", (v) => `${Number(v).toFixed(1)} samples/s`],
  ["Key set size", "keyset_bytes_batch", fmtBytes],
  ["Request per sample", "request_bytes_per_sample", (v) => fmtBytes(Math.round(v))],
  ["Response per sample", "response_bytes_per_sample", (v) => fmtBytes(Math.round(v))],
  ["Calibration samples", "calibration_samples"],
  ["Plan digest", "plan_digest", (v) => h("code", {}, v)],
  ["Compiled", "compiled_at", fmtTime],
];

function heCard(version) {
  const r = version.he_report;
  const rows = HE_FIELDS.filter(([, k]) => r[k] !== undefined && r[k] !== null).map(([label, k, f]) =>
    h("tr", {}, h("th", { scope: "row" }, label), h("td", {}, f ? f(r[k]) : String(r[k]))),
  );
  return h(
    "section",
    { class: "panel he-card", id: "he-card" },
    h("h3", {}, `HE model card (version ${version.number})`),
    h("table", { class: "kv" }, h("tbody", {}, rows)),
  );
}

// Contract modes: how each is shown, and what it reveals to whom (docs/gateway.md).
const MODE_LABELS = {
  he_inference: "encrypted inference (HE)",
  remote_job: "remote jobs",
  gateway: "gateway (plaintext)",
};

function modeLabel(m) {
  return MODE_LABELS[m] || m;
}

function gatewayNotice(hosting) {
  const site = hosting === "provider" ? "the provider's agent" : "the marketplace's compute worker";
  return h(
    "p",
    { class: "notice gateway-reveals", id: "gateway-reveals" },
    h("strong", {}, "Gateway mode reveals your inputs to the compute site: "),
    `${site} sees the rows you send in plaintext (and the predictions). The weights stay where they are`,
    hosting === "provider" ? " (on the provider's machine)." : " (decrypted only in the worker's memory).",
    " Use encrypted inference (HE) when the inputs must stay hidden.",
  );
}

function termsSummary(t) {
  if (!t) return "";
  const parts = [];
  if (t.modes) parts.push(t.modes.map(modeLabel).join(", "));
  if (t.quota_units !== undefined) parts.push(`quota ${t.quota_units} units`);
  if (t.rate) parts.push(`rate ${t.rate.units}/${t.rate.window_seconds}s`);
  if (t.price) parts.push(`${fmtMoney(t.price.unit_price_minor, t.price.currency)} per unit`);
  if (t.valid_until) parts.push(`until ${fmtTime(t.valid_until)}`);
  return parts.join(" · ");
}

async function offeringView(params, [id]) {
  if (!id) throw new ApiError(404, "not_found", "No offering id in the address.");
  const path = `/v1/offerings/${encodeURIComponent(id)}`;
  const [o, versions] = await Promise.all([api(path), api(`${path}/versions`)]);
  let offers = null;
  let offersError = null;
  try {
    offers = await api(`${path}/offers`);
  } catch (e) {
    offersError = e.message;
  }
  const card = h("div", { class: "markdown", id: "model-card" });
  if (o.model_card) card.append(renderMarkdown(o.model_card));
  else card.append(h("p", { class: "empty" }, "No model card."));
  const sorted = [...versions].sort((a, b) => b.number - a.number);
  const withHE = sorted.find((v) => v.he_report);
  const owner = me && me.org_id === o.org_id && hasRole("provider");
  const [validation, access] = await Promise.all([
    validationPanel(UI, o, sorted[0]),
    owner ? accessPanel(UI, o) : null,
  ]);
  return [
    h("p", {}, h("a", { href: "#/catalog" }, "← Catalog")),
    h("h2", {}, o.name, " ", agentBadge(o)),
    h(
      "dl",
      { class: "meta" },
      [
        ["Offering", h("code", {}, o.id)],
        ["Task", o.task],
        [
          "Hosting",
          o.hosting === "provider"
            ? "provider-hosted (weights stay with the provider's agent)"
            : "marketplace-hosted (encrypted at rest)",
        ],
        ["Status", o.status],
        ["Licence", o.licence],
        ["Tags", o.tags.length ? o.tags.map((t) => badge(`#${t}`, "tag")) : "none"],
        ["Provider org", h("code", {}, o.org_id)],
        ["Updated", fmtTime(o.updated_at)],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    ),
    o.description ? h("p", { class: "desc" }, o.description) : null,
    h("section", { class: "panel" }, h("h3", {}, "Model card"), card),
    withHE
      ? heCard(withHE)
      : h(
          "section",
          { class: "panel" },
          h("h3", {}, "HE model card"),
          h("p", { class: "empty" }, "Not compiled for encrypted inference yet."),
        ),
    h(
      "section",
      { class: "panel" },
      h("h3", {}, "Versions"),
      sorted.length
        ? table(
            ["#", "Format", "Digest", "Size", "Input shape", "Created"],
            sorted.map((v) =>
              h(
                "tr",
                {},
                h("td", {}, v.number),
                h("td", {}, v.format),
                h("td", {}, h("code", { class: "digest", title: v.digest }, v.digest)),
                h("td", {}, fmtBytes(v.size)),
                h("td", {}, `[${v.input_shape.join(", ")}]`),
                h("td", {}, fmtTime(v.created_at)),
              ),
            ),
            "versions",
          )
        : h("p", { class: "empty" }, "No versions uploaded."),
    ),
    validation,
    access,
    owner && o.hosting === "marketplace" ? uploadPanel(UI, o) : null,
    h(
      "section",
      { class: "panel" },
      h("h3", {}, "Offers"),
      offersError
        ? h("p", { class: "error" }, offersError)
        : offers.length
          ? table(
              ["Offer", "Status", "Terms"],
              offers.map((of) =>
                h(
                  "tr",
                  {},
                  h("td", {}, h("code", {}, short(of.id, 16))),
                  h("td", {}, of.status),
                  h("td", {}, termsSummary(of.offer && of.offer.terms)),
                ),
              ),
            )
          : h("p", { class: "empty" }, "No open offers."),
      offers && offers.some((of) => of.offer && of.offer.terms && (of.offer.terms.modes || []).includes("gateway"))
        ? gatewayNotice(o.hosting)
        : null,
    ),
  ];
}

// -- contracts -------------------------------------------------------------------------------

async function downloadStatement(id, button) {
  button.disabled = true;
  try {
    const r = await api(`/v1/contracts/${encodeURIComponent(id)}/statement`, {
      params: { format: "csv" },
      accept: "text/csv",
      raw: true,
    });
    const url = URL.createObjectURL(await r.blob());
    const a = h("a", { href: url, download: `statement-${id}.csv`, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (e) {
    flash(e.message);
  } finally {
    button.disabled = false;
  }
}

async function contractsView(params) {
  const q = Object.fromEntries(params);
  const roles = ["consumer", "provider"].filter((r) => hasRole(r, "admin"));
  const role = roles.includes(q.role) ? q.role : (roles[0] ?? "consumer");
  const offset = Number(q.offset ?? 0) || 0;
  const page = await api("/v1/contracts", { params: { role, limit: PAGE, offset } });
  const tabs = h(
    "div",
    { class: "tabs", role: "tablist" },
    roles.map((r) =>
      h("a", { href: hashFor("contracts", { role: r }), role: "tab", "aria-selected": String(r === role) }, `As ${r}`),
    ),
  );
  const rows = page.items.map((c) => {
    const u = c.usage;
    const t = c.terms;
    const statusKind = c.effective_status === "active" ? "ok" : c.effective_status === "terminated" ? "bad" : "warn";
    const btn = h("button", { type: "button", class: "secondary statement" }, "Statement (CSV)");
    btn.addEventListener("click", () => downloadStatement(c.id, btn));
    const charged = t.price ? fmtMoney(u.used_units * t.price.unit_price_minor, t.price.currency) : "";
    return h(
      "tr",
      { "data-contract": c.id },
      h(
        "td",
        {},
        h("code", {}, short(c.id, 16)),
        h("br"),
        h("a", { href: `#/offering/${encodeURIComponent(c.offering_id)}`, class: "muted" }, "offering"),
      ),
      h(
        "td",
        {},
        h(
          "code",
          { title: role === "consumer" ? c.provider_org_id : c.consumer_org_id },
          short(role === "consumer" ? c.provider_org_id : c.consumer_org_id, 16),
        ),
      ),
      h("td", {}, badge(c.effective_status, statusKind)),
      h("td", { class: "terms" }, termsSummary(t)),
      h(
        "td",
        { class: "usage" },
        h("meter", { min: 0, max: Math.max(u.quota_units, 1), value: u.used_units }),
        h("div", {}, `${u.used_units} / ${u.quota_units} units used`),
        h(
          "div",
          { class: "muted" },
          `${u.reserved_units} reserved · ${u.remaining_units} left${charged ? ` · ${charged} charged` : ""}`,
        ),
      ),
      h("td", {}, btn),
    );
  });
  return [
    h("h2", {}, "Contracts"),
    roles.length > 1 ? tabs : null,
    rows.length
      ? table(
          ["Contract", role === "consumer" ? "Provider" : "Consumer", "Status", "Terms", "Usage", ""],
          rows,
          "contracts",
        )
      : h("p", { class: "empty" }, "No contracts."),
    pager(page, (off) => go("contracts", { role, offset: off })),
  ];
}

// -- compliance: audit trail -----------------------------------------------------------------

async function auditView(params) {
  const q = Object.fromEntries(params);
  const form = h(
    "form",
    { class: "filters", id: "audit-filters" },
    field("Action", h("input", { name: "action", value: q.action ?? "", placeholder: "e.g. offering.create" })),
    field(
      "Outcome",
      select("outcome", q.outcome, [
        ["", "any"],
        ["success", "success"],
        ["denied", "denied"],
        ["failure", "failure"],
      ]),
    ),
    field("Organisation id", h("input", { name: "org_id", value: q.org_id ?? "", placeholder: "org_…" })),
    field("Actor", h("input", { name: "actor", value: q.actor ?? "", placeholder: "key id" })),
    field("From", h("input", { name: "since", type: "datetime-local", value: toLocalInput(q.since) })),
    field("Until", h("input", { name: "until", type: "datetime-local", value: toLocalInput(q.until) })),
    h("button", { type: "submit", class: "primary" }, "Filter"),
    h("button", { type: "button", class: "secondary", onclick: () => go("audit") }, "Clear"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = Object.fromEntries(new FormData(form));
    f.since = fromLocalInput(f.since);
    f.until = fromLocalInput(f.until);
    go("audit", f);
  });
  const offset = Number(q.offset ?? 0) || 0;
  const page = await api("/v1/audit", {
    params: {
      action: q.action,
      outcome: q.outcome,
      org_id: q.org_id,
      actor: q.actor,
      since: q.since,
      until: q.until,
      limit: PAGE,
      offset,
    },
  });
  const rows = page.items.map((e) =>
    h(
      "tr",
      { "data-seq": e.seq },
      h("td", {}, e.seq),
      h("td", { class: "when" }, fmtTime(e.time)),
      h("td", {}, h("code", { class: "nowrap", title: e.actor }, short(e.actor, 16))),
      h("td", {}, e.org_id ? h("code", { class: "nowrap", title: e.org_id }, short(e.org_id, 16)) : ""),
      h("td", { class: "action" }, e.action),
      h("td", {}, h("code", { class: "nowrap", title: e.target }, short(e.target, 24))),
      h(
        "td",
        { class: "outcome" },
        badge(e.outcome, e.outcome === "success" ? "ok" : e.outcome === "denied" ? "bad" : "warn"),
      ),
      h("td", {}, Object.keys(e.detail ?? {}).length ? h("code", { class: "detail" }, JSON.stringify(e.detail)) : ""),
    ),
  );
  return [
    h("h2", {}, "Audit trail"),
    form,
    rows.length
      ? table(["#", "Time", "Actor", "Org", "Action", "Target", "Outcome", "Detail"], rows, "audit")
      : h("p", { class: "empty" }, "No events match."),
    pager(page, (off) => go("audit", { ...q, offset: off })),
  ];
}

// -- compliance: ledger ----------------------------------------------------------------------

function recordSummary(r) {
  switch (r.schema) {
    case "som.usage/v1":
      return `usage · ${r.mode} · ${r.units} units · ${r.outcome} · ${fmtMoney(r.amount_minor, r.currency)} · contract ${short(r.contract_id, 14)}`;
    case "som.audit/v1":
      return `audit · ${r.action} · ${r.outcome} · by ${r.actor}`;
    case "som.contract/v1":
      return `contract accepted · ${short(r.contract_id, 14)}`;
    case "som.contract-event/v1":
      return `contract event · ${(r.event && r.event.kind) || ""} · ${short(r.contract_id, 14)}`;
    case "som.job-approval/v1":
      return `job approval · ${r.decision} · job ${short(r.job_id, 14)}`;
    default:
      return r.schema ?? "record";
  }
}

// The log key the user pinned in this browser (localStorage: survives the tab, unlike the API
// key). Checkpoints are checked against it, not against the key the same server serves; the
// served key is only compared with it (docs/web-ui.md).
const PINNED_LOG_KEY = "som.ledger.pinnedLogKey";

function pinnedLogKey() {
  try {
    const v = JSON.parse(localStorage.getItem(PINNED_LOG_KEY) ?? "null");
    return v && typeof v.vkey === "string" && typeof v.origin === "string" ? v : null;
  } catch {
    return null;
  }
}

/** Check the checkpoint against the pinned key (or, with none pinned, the served one); resolve to
 * what the page shows about the log key, never reject. */
async function checkLogKey(note, cp, vkey) {
  const pinned = pinnedLogKey();
  const served = { vkey, name: parseVkey(vkey).name, fingerprint: await vkeyFingerprint(vkey) };
  if (pinned === null) {
    try {
      await verifyNoteSignature(note, vkey);
    } catch (e) {
      return { state: "unpinned", served, sigError: e.message };
    }
    return { state: "unpinned", served };
  }
  const mine = { ...pinned, name: parseVkey(pinned.vkey).name, fingerprint: await vkeyFingerprint(pinned.vkey) };
  const problems = [];
  if (!sameVkey(vkey, pinned.vkey)) problems.push("the server presents a different log key than the one you pinned");
  if (cp.origin !== pinned.origin)
    problems.push(`the checkpoint is for origin ${cp.origin}, the pinned log is ${pinned.origin}`);
  try {
    await verifyNoteSignature(note, pinned.vkey);
  } catch {
    problems.push("the checkpoint is not signed by the pinned key");
  }
  return { state: problems.length ? "mismatch" : "pinned", served, pinned: mine, problems };
}

function logKeyPanel(trust, cp) {
  const { served } = trust;
  const fp = (k, id) => h("code", { class: "fingerprint", id }, k.fingerprint);
  const line = h(
    "p",
    { id: "log-key" },
    "Log key ",
    h("code", {}, served.name),
    " · fingerprint ",
    fp(served, "log-key-fingerprint"),
    " · ",
  );
  const box = h("div", { id: "log-key-panel" }, line);
  if (trust.state === "unpinned") {
    const pin = h("button", { type: "button", class: "secondary", id: "pin-key" }, "Pin this key");
    pin.addEventListener("click", () => {
      localStorage.setItem(
        PINNED_LOG_KEY,
        JSON.stringify({ vkey: served.vkey, origin: cp.origin, pinned_at: new Date().toISOString() }),
      );
      sessionStorage.setItem("som.ledger.justPinned", "1");
      render();
    });
    line.append(
      h(
        "span",
        { class: "muted", id: "pin-status" },
        "not pinned: compare the fingerprint with the one the operator publishes, out of band, then ",
      ),
      pin,
    );
  } else if (trust.state === "pinned") {
    line.append(h("span", { class: "verified ok", id: "pin-status" }, "✓ matches the key you pinned"));
    if (sessionStorage.getItem("som.ledger.justPinned")) {
      sessionStorage.removeItem("som.ledger.justPinned");
      box.append(
        h(
          "p",
          { class: "notice", id: "pin-notice", role: "status" },
          `Pinned log key ${served.name} (fingerprint ${served.fingerprint}, origin ${cp.origin}) in this browser. `,
          "Check this fingerprint out of band (the operator's published one, or `som ledger key` over a channel you trust). ",
          "Every checkpoint is now checked against this key; a different key or origin is flagged in red.",
        ),
      );
    }
  } else {
    const unpin = h("button", { type: "button", class: "secondary", id: "unpin-key" }, "Forget the pinned key");
    unpin.addEventListener("click", () => {
      localStorage.removeItem(PINNED_LOG_KEY);
      render();
    });
    line.append(h("span", { class: "verified bad", id: "pin-status" }, "✗ NOT the key you pinned"));
    box.append(
      h(
        "div",
        { class: "key-warning", id: "key-warning", role: "alert" },
        h("strong", {}, "⚠ Do not trust this ledger view: " + trust.problems.join("; ") + "."),
        h(
          "p",
          {},
          "Pinned: ",
          h("code", {}, trust.pinned.name),
          " fingerprint ",
          fp(trust.pinned, "pinned-fingerprint"),
          ` · origin ${trust.pinned.origin}`,
        ),
        h(
          "p",
          {},
          "Served: ",
          h("code", {}, served.name),
          " fingerprint ",
          fp(served, "served-fingerprint"),
          ` · checkpoint origin ${cp.origin}`,
        ),
        h(
          "p",
          {},
          "If the operator really rotated the key, confirm the new fingerprint out of band before pinning it. ",
          unpin,
        ),
      ),
    );
  }
  return box;
}

async function verifyLeaf(leaf, cp, cell, button, trusted) {
  button.disabled = true;
  cell.replaceChildren(h("span", { class: "muted" }, "verifying…"));
  try {
    const trust = await trusted;
    if (trust.state === "mismatch")
      throw new Error("the checkpoint is not the pinned log's: " + trust.problems.join("; "));
    if (trust.state === "error") throw new Error(trust.message);
    if (trust.sigError) throw new Error(trust.sigError);
    const proof = await api("/v1/ledger/proof/inclusion", { params: { index: leaf.index, size: cp.size } });
    if (proof.size !== cp.size || proof.index !== leaf.index)
      throw new Error("the server answered for another leaf or tree");
    await verifyInclusion(b64decode(leaf.leaf), leaf.index, cp.size, proof.proof.map(b64decode), cp.root);
    cell.replaceChildren(
      h(
        "span",
        {
          class: "verified ok",
          title: `SHA-256 inclusion proof of ${proof.proof.length} hashes checked against the checkpoint root (size ${cp.size})`,
        },
        "✓ included",
      ),
    );
  } catch (e) {
    cell.replaceChildren(h("span", { class: "verified bad", title: e.message }, `✗ ${e.message}`));
  } finally {
    button.disabled = false;
  }
}

async function ledgerView(params) {
  const q = Object.fromEntries(params);
  const r = await api("/v1/ledger/checkpoint", { accept: "text/plain", raw: true });
  const note = await r.text();
  const cp = parseCheckpoint(note);
  const sig = h("span", { class: "muted", id: "checkpoint-signature" }, "checking signature…");
  const keyPanel = h("div", { class: "log-key" }, h("span", { class: "muted" }, "checking the log key…"));
  const trusted = api("/v1/ledger/key", { accept: "text/plain", raw: true })
    .then((kr) => kr.text())
    .then((vkey) => checkLogKey(note, cp, vkey.trim()))
    .catch((e) => ({ state: "error", message: e.message }));
  trusted.then((trust) => {
    if (trust.state === "error") {
      sig.replaceChildren(h("span", { class: "verified bad" }, `✗ ${trust.message}`));
      keyPanel.replaceChildren();
      return;
    }
    if (trust.sigError) sig.replaceChildren(h("span", { class: "verified bad" }, `✗ ${trust.sigError}`));
    else if (trust.state === "unpinned")
      sig.replaceChildren(
        h("span", { class: "verified ok" }, `✓ signed by ${trust.served.name} (the served key; not pinned)`),
      );
    else if (trust.state === "pinned")
      sig.replaceChildren(h("span", { class: "verified ok" }, `✓ signed by the pinned key ${trust.pinned.name}`));
    else sig.replaceChildren(h("span", { class: "verified bad" }, "✗ not verified against the pinned key"));
    keyPanel.replaceChildren(logKeyPanel(trust, cp));
  });

  const lastPage = Math.max(0, Math.floor(Math.max(cp.size - 1, 0) / PAGE) * PAGE);
  const start = q.start !== undefined && /^\d+$/.test(q.start) ? Number(q.start) : lastPage;
  const [leaves, totals] = await Promise.all([
    api("/v1/ledger/leaves", { params: { start, end: start + PAGE } }),
    api("/v1/ledger/totals"),
  ]);
  const signNow = h("button", { type: "button", class: "secondary", id: "sign-checkpoint" }, "Sign a checkpoint now");
  signNow.addEventListener("click", async () => {
    signNow.disabled = true;
    try {
      await api("/v1/ledger/checkpoints", { method: "POST" });
      render();
    } catch (e) {
      flash(e.message);
      signNow.disabled = false;
    }
  });
  const rows = leaves.map((leaf) => {
    const cell = h("td", { class: "verify-result" });
    const btn = h(
      "button",
      {
        type: "button",
        class: "secondary verify",
        disabled: leaf.index >= cp.size,
        title:
          leaf.index >= cp.size
            ? "Not covered by the latest checkpoint yet: sign a checkpoint first"
            : "Fetch the inclusion proof and check it here, in your browser",
      },
      "Verify",
    );
    btn.addEventListener("click", () => verifyLeaf(leaf, cp, cell, btn, trusted));
    return h(
      "tr",
      { "data-index": leaf.index },
      h("td", {}, leaf.index),
      h("td", { class: "when" }, fmtTime(leaf.record.time)),
      h(
        "td",
        { class: "record" },
        h(
          "details",
          {},
          h("summary", {}, recordSummary(leaf.record)),
          h("pre", {}, JSON.stringify(leaf.record, null, 2)),
        ),
      ),
      h("td", {}, h("code", { class: "nowrap", title: leaf.leaf_hash }, short(leaf.leaf_hash, 10))),
      h("td", {}, btn),
      cell,
    );
  });
  const totalRows = totals.map((t) =>
    h(
      "tr",
      {},
      h("td", {}, h("code", {}, t.contract_id)),
      h("td", {}, t.charged_units),
      h("td", {}, fmtMoney(t.amount_minor, t.currency)),
      h("td", {}, t.usage_records),
      h("td", {}, t.released_records),
    ),
  );
  const prev = Math.max(0, start - PAGE);
  return [
    h("h2", {}, "Ledger"),
    h(
      "section",
      { class: "panel checkpoint" },
      h("h3", {}, "Latest signed checkpoint"),
      h(
        "p",
        {},
        "Tree size ",
        h("strong", { id: "tree-size" }, String(cp.size)),
        " · origin ",
        h("code", {}, cp.origin),
        " · ",
        sig,
      ),
      keyPanel,
      h("pre", { id: "checkpoint-note" }, note),
      signNow,
    ),
    h(
      "section",
      { class: "panel" },
      h("h3", {}, "Totals per contract"),
      totalRows.length
        ? table(["Contract", "Charged units", "Amount", "Usage records", "Released"], totalRows, "totals")
        : h("p", { class: "empty" }, "No usage recorded yet."),
    ),
    h(
      "section",
      { class: "panel" },
      h("h3", {}, `Leaves ${start}–${start + leaves.length - 1}`),
      leaves.length
        ? table(["#", "Time", "Record", "Leaf hash", "", "Inclusion"], rows, "leaves")
        : h("p", { class: "empty" }, "No leaves here."),
      h(
        "nav",
        { class: "pager" },
        h(
          "button",
          { type: "button", disabled: start <= 0, onclick: () => go("ledger", { start: prev }) },
          "← Earlier",
        ),
        h(
          "button",
          { type: "button", disabled: leaves.length < PAGE, onclick: () => go("ledger", { start: start + PAGE }) },
          "Later →",
        ),
      ),
    ),
  ];
}

// -- account ---------------------------------------------------------------------------------

async function personalKeyForm() {
  const out = h("div", { id: "personal-key" });
  const days = h("input", { id: "pk-days", name: "pk-days", type: "number", min: "1", max: "30", value: "30" });
  const name = h("input", { id: "pk-name", name: "pk-name", type: "text", placeholder: "laptop CLI" });
  const form = h(
    "form",
    { class: "panel", id: "personal-key-form" },
    h("h3", {}, "Personal API key"),
    h(
      "p",
      { class: "muted" },
      "For the CLI or the SDK: your roles at most, 30 days at most; it stops working when your groups no longer give you its roles.",
    ),
    field("Name", name),
    field("Lifetime (days)", days),
    h("button", { type: "submit", class: "primary" }, "Create key"),
    out,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const k = await api("/v1/auth/keys", {
        method: "POST",
        body: { name: name.value, ttl_days: Number(days.value) },
      });
      out.replaceChildren(h("p", {}, "Shown once; store it now: "), h("code", { id: "personal-key-value" }, k.key));
    } catch (e) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, e.message));
    }
  });
  return form;
}

async function meView() {
  if (sso) {
    const m = await api("/v1/auth/me");
    sso.csrf = m.csrf_token;
    me = m;
    renderChrome();
    return [
      h("h2", {}, "Account"),
      h(
        "dl",
        { class: "meta", id: "whoami" },
        [
          ["Signed in as", m.user ? `${m.user.name} <${m.user.email}>` : m.key_id],
          ["User id", h("code", {}, m.key_id)],
          ["Organisation", m.org_name],
          ["Organisation id", h("code", {}, m.org_id)],
          ["Teams", (m.user ? m.user.teams : []).join(", ") || "none"],
          ["Roles", m.roles.map((r) => badge(r, "role"))],
          ["Session until", fmtTime(m.session_expires_at)],
        ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
      ),
      h(
        "p",
        { class: "muted" },
        "Signed in with SSO: your roles and teams come from your organisation's groups, re-read at every sign-in.",
      ),
      await personalKeyForm(),
    ];
  }
  me = await api("/v1/whoami");
  renderChrome();
  return [
    h("h2", {}, "Account"),
    h(
      "dl",
      { class: "meta", id: "whoami" },
      [
        ["Organisation", me.org_name],
        ["Organisation id", h("code", {}, me.org_id)],
        ["Key id", h("code", {}, me.key_id)],
        ["Roles", me.roles.map((r) => badge(r, "role"))],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    ),
    h(
      "p",
      { class: "muted" },
      "The key is kept in this tab's session storage only; closing the tab or signing out forgets it.",
    ),
  ];
}

// -- federations: rounds, participants, accuracy per round ---------------------------------------

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs ?? {})) el.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function accuracyPlot(rounds) {
  const pts = rounds.filter((r) => typeof r.metrics.accuracy === "number").map((r) => [r.number, r.metrics.accuracy]);
  if (!pts.length) return h("p", { class: "muted" }, "No accuracy yet.");
  const W = 480,
    H = 200,
    P = 32;
  const maxX = Math.max(...pts.map((p) => p[0]), 2);
  const lo = Math.max(0, Math.min(...pts.map((p) => p[1])) - 0.05);
  const x = (n) => P + ((n - 1) / (maxX - 1)) * (W - 2 * P);
  const y = (a) => H - P - ((a - lo) / (1 - lo || 1)) * (H - 2 * P);
  return svg(
    "svg",
    {
      id: "accuracy-plot",
      viewBox: `0 0 ${W} ${H}`,
      width: W,
      height: H,
      role: "img",
      "aria-label": "Accuracy per round",
    },
    svg("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "currentColor" }),
    svg("line", { x1: P, y1: P, x2: P, y2: H - P, stroke: "currentColor" }),
    svg("text", { x: P, y: P - 8, "font-size": 11 }, "accuracy"),
    svg("text", { x: W - P, y: H - 8, "font-size": 11, "text-anchor": "end" }, "round"),
    svg("text", { x: 4, y: y(1) + 4, "font-size": 10 }, "1.0"),
    svg("text", { x: 4, y: y(lo) + 4, "font-size": 10 }, lo.toFixed(2)),
    svg("polyline", {
      points: pts.map((p) => `${x(p[0])},${y(p[1])}`).join(" "),
      fill: "none",
      stroke: "currentColor",
      "stroke-width": 2,
    }),
    pts.map((p) =>
      svg(
        "circle",
        { class: "point", cx: x(p[0]), cy: y(p[1]), r: 3 },
        svg("title", {}, `round ${p[0]}: ${p[1].toFixed(4)}`),
      ),
    ),
  );
}

async function federationsView() {
  const rows = await api("/v1/federations");
  return h(
    "section",
    { class: "panel" },
    h("h2", {}, "Federations"),
    rows.length
      ? table(
          ["Federation", "Status", "Rounds", "Participants", "ε spent"],
          rows.map((f) =>
            h(
              "tr",
              {},
              h("td", {}, h("a", { href: `#/federation/${encodeURIComponent(f.id)}` }, f.name || f.id)),
              h("td", {}, f.status),
              h("td", {}, `${f.rounds_done} / ${f.recipe.rounds}`),
              h("td", {}, String(f.participants.length)),
              h("td", {}, f.epsilon_spent.toFixed(3)),
            ),
          ),
        )
      : h("p", { class: "muted" }, "None: your organisation runs or takes part in no federation."),
  );
}

async function federationView(params, [id]) {
  const [f, rounds] = await Promise.all([
    api(`/v1/federations/${encodeURIComponent(id)}`),
    api(`/v1/federations/${encodeURIComponent(id)}/rounds`),
  ]);
  return [
    h(
      "section",
      { class: "panel" },
      h("h2", {}, `Federation ${f.name || f.id}`),
      h(
        "p",
        { id: "federation-status" },
        `Status: ${f.status}; ${f.rounds_done} of ${f.recipe.rounds} rounds; ε spent ${f.epsilon_spent.toFixed(3)}` +
          (f.terms.epsilon ? ` of ${f.terms.epsilon}` : "") +
          (f.result_version_id ? `; new version ${f.result_version_id}` : ""),
      ),
      f.error ? h("p", { class: "error" }, f.error) : null,
      h("h3", {}, "Accuracy per round"),
      accuracyPlot(rounds),
    ),
    h(
      "section",
      { class: "panel" },
      h("h3", {}, "Participants"),
      table(
        ["Organisation", "Samples", "Rounds", "Units", "Credit", "ε"],
        f.participants.map((p) =>
          h(
            "tr",
            {},
            h("td", {}, p.org_id),
            h("td", {}, String(p.samples)),
            h("td", {}, String(p.rounds)),
            h("td", {}, String(p.units)),
            h("td", {}, String(p.credit_minor)),
            h("td", {}, p.epsilon_spent.toFixed(3)),
          ),
        ),
        "participants",
      ),
    ),
    h(
      "section",
      { class: "panel" },
      h("h3", {}, "Rounds"),
      table(
        ["Round", "Participants", "Accuracy", "ε", "Ledger leaves"],
        rounds.map((r) =>
          h(
            "tr",
            {},
            h("td", {}, String(r.number)),
            h("td", {}, String(r.participants.length)),
            h("td", {}, typeof r.metrics.accuracy === "number" ? r.metrics.accuracy.toFixed(4) : "–"),
            h("td", {}, r.epsilon.toFixed(3)),
            h("td", {}, r.ledger_indexes.join(", ")),
          ),
        ),
        "rounds",
      ),
    ),
  ];
}

// -- router ----------------------------------------------------------------------------------

// What access.js builds with (it has no helpers of its own).
const UI = { h, api, flash, badge, table, fmtTime, rerender: () => render() };

const VIEWS = {
  teams: () => teamsView(UI),
  catalog: catalogView,
  offering: offeringView,
  contracts: contractsView,
  audit: auditView,
  ledger: ledgerView,
  monitoring: (params) => monitoringView(params, { api, roles: me.roles, go: (p) => go("monitoring", p) }),
  federations: federationsView,
  federation: federationView,
  me: meView,
};

async function detectSession() {
  // A session cookie is HttpOnly: ask the server whether this browser is signed in with SSO.
  try {
    const cfg = await (await fetch("/v1/auth/config", { cache: "no-store", credentials: "omit" })).json();
    ssoAvailable = Boolean(cfg.sso);
  } catch {
    ssoAvailable = false;
  }
  if (!ssoAvailable || sessionStorage.getItem(KEY)) return;
  const r = await fetch("/v1/auth/me", {
    cache: "no-store",
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (r.ok) {
    const m = await r.json();
    sso = { csrf: m.csrf_token };
    me = m;
  }
}

async function render() {
  if (!sessionStorage.getItem(KEY) && !sso) {
    signInView();
    return;
  }
  const seq = ++renderSeq;
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?", 2);
  const [view, ...rest] = (path || defaultView()).split("/").map(decodeURIComponent);
  const fn = VIEWS[view];
  if (me) renderChrome();
  main.setAttribute("aria-busy", "true");
  try {
    if (!me) {
      me = await api("/v1/whoami");
      renderChrome();
    }
    if (!fn) throw new ApiError(404, "not_found", `There is no page "${view}".`);
    const nodes = await fn(new URLSearchParams(query ?? ""), rest);
    if (seq !== renderSeq) return;
    main.replaceChildren(...[nodes].flat(Infinity).filter(Boolean));
  } catch (e) {
    if (seq !== renderSeq) return;
    if (e instanceof ApiError && e.status === 401) {
      sessionStorage.removeItem(KEY);
      sso = null;
      me = null;
      signInView(e.message);
      return;
    }
    main.replaceChildren(
      h(
        "section",
        { class: "panel error-panel", role: "alert" },
        h("h2", {}, "Something went wrong"),
        h("p", { class: "error", id: "view-error" }, e.message),
        h("p", {}, h("a", { href: "#/catalog" }, "Back to the catalog")),
      ),
    );
  } finally {
    if (seq === renderSeq) main.removeAttribute("aria-busy");
  }
}

window.addEventListener("hashchange", () => {
  flash("");
  render();
});
window.addEventListener("unhandledrejection", (ev) => flash(String((ev.reason && ev.reason.message) || ev.reason)));
window.addEventListener("error", (ev) => flash(ev.message));
detectSession().finally(render);
