// Access Control Dashboard: validation reports, visibility, grants, publish/withdraw, teams
// (docs/sharing.md). Built from the helpers app.js passes in (h, api, flash, badge, table, fmtTime,
// rerender); like the rest of the UI it is a client of the /v1 API and never uses innerHTML.

function checksTable(ui, report) {
  const { h, table, badge } = ui;
  return table(
    ["Check", "Result", "Detail"],
    (report.checks || []).map((c) =>
      h(
        "tr",
        {},
        h("td", {}, c.name),
        h("td", {}, badge(c.ok ? "ok" : "failed", c.ok ? "ok" : "warn")),
        h("td", {}, c.detail),
      ),
    ),
    "validation-checks",
  );
}

// The latest version's validation report: for everyone who may read the offering.
export async function validationPanel(ui, o, latest) {
  const { h, api, badge } = ui;
  if (!latest) return null;
  const rep = await api(`/v1/offerings/${encodeURIComponent(o.id)}/versions/${latest.number}/validation`);
  return h(
    "section",
    { class: "panel", id: "validation" },
    h("h3", {}, `Validation of version ${latest.number} `, badge(rep.status, rep.status === "passed" ? "ok" : "warn")),
    rep.reason ? h("p", { class: "error", id: "validation-reason" }, rep.reason) : null,
    rep.meta && Object.keys(rep.meta.metrics || {}).length
      ? h(
          "p",
          { class: "muted" },
          `Declared on: ${rep.meta.measured_on || "(not said)"}`,
          rep.meta.notes ? ` · ${rep.meta.notes}` : "",
        )
      : null,
    checksTable(ui, rep),
  );
}

async function act(ui, fn, done) {
  try {
    await fn();
    await ui.rerender();
    if (done) ui.flash(done, "ok"); // after the new page is in place: the message means "done"
  } catch (e) {
    ui.flash(e.message);
  }
}

// Owner controls: publish/withdraw, visibility, grants (needs admin on the offering).
export async function accessPanel(ui, o) {
  const { h, api, table, fmtTime } = ui;
  const base = `/v1/offerings/${encodeURIComponent(o.id)}`;
  let grants;
  try {
    grants = await api(`${base}/grants`);
  } catch (e) {
    return h("section", { class: "panel", id: "access" }, h("h3", {}, "Access"), h("p", { class: "muted" }, e.message));
  }
  const vis = h(
    "select",
    { id: "visibility", name: "visibility", "aria-label": "Visibility" },
    ["public", "organisation", "shared"].map((v) => h("option", { value: v, selected: v === o.visibility }, v)),
  );
  const who = h("input", {
    id: "grant-grantee",
    placeholder: "org_... or team_...",
    "aria-label": "Grantee",
    size: 28,
  });
  const perm = h(
    "select",
    { id: "grant-permission", "aria-label": "Permission" },
    ["read", "write", "admin"].map((v) => h("option", { value: v }, v)),
  );
  const grant = () => {
    const id = who.value.trim();
    const body = { permission: perm.value, [id.startsWith("team_") ? "team_id" : "org_id"]: id };
    return act(ui, () => api(`${base}/grants`, { method: "POST", body }), `granted ${perm.value} to ${id}`);
  };
  return h(
    "section",
    { class: "panel", id: "access" },
    h("h3", {}, "Access"),
    h(
      "p",
      {},
      o.status === "published"
        ? h(
            "button",
            {
              type: "button",
              id: "withdraw",
              onclick: () => act(ui, () => api(`${base}/withdraw`, { method: "POST" }), "withdrawn"),
            },
            "Withdraw",
          )
        : h(
            "button",
            {
              type: "button",
              id: "publish",
              onclick: () => act(ui, () => api(`${base}/publish`, { method: "POST" }), "published"),
            },
            "Publish",
          ),
      " Visibility ",
      vis,
      " ",
      h(
        "button",
        {
          type: "button",
          id: "set-visibility",
          onclick: () =>
            act(
              ui,
              () => api(`${base}/visibility`, { method: "PUT", body: { visibility: vis.value } }),
              `visibility: ${vis.value}`,
            ),
        },
        "Set",
      ),
    ),
    grants.length
      ? table(
          ["Grantee", "Permission", "Since", ""],
          grants.map((g) =>
            h(
              "tr",
              { "data-grant": g.id },
              h("td", {}, h("code", {}, g.team_id || g.org_id)),
              h("td", {}, g.permission),
              h("td", {}, fmtTime(g.created_at)),
              h(
                "td",
                {},
                h(
                  "button",
                  {
                    type: "button",
                    class: "secondary revoke",
                    onclick: () =>
                      act(
                        ui,
                        () => api(`${base}/grants/${encodeURIComponent(g.id)}`, { method: "DELETE", raw: true }),
                        "revoked",
                      ),
                  },
                  "Revoke",
                ),
              ),
            ),
          ),
          "grants",
        )
      : h("p", { class: "empty", id: "no-grants" }, "No grants."),
    h("p", {}, "Grant ", who, " ", perm, " ", h("button", { type: "button", id: "grant", onclick: grant }, "Grant")),
  );
}

// An evaluation CSV (features, then the label; a header row is skipped) as {x, y}.
function parseCsv(text) {
  const x = [];
  const y = [];
  for (const line of text.split(/\r?\n/)) {
    if (!line.trim()) continue;
    const vals = line.split(",").map(Number);
    if (vals.some(Number.isNaN)) {
      if (!x.length) continue;
      throw new Error(`evaluation CSV: not a number in "${line.slice(0, 40)}"`);
    }
    x.push(vals.slice(0, -1));
    y.push(vals[vals.length - 1]);
  }
  return { x, y };
}

// Upload a version, then declare its metrics with an evaluation set (write on the offering).
export function uploadPanel(ui, o) {
  const { h, api } = ui;
  const base = `/v1/offerings/${encodeURIComponent(o.id)}`;
  const file = h("input", { type: "file", id: "version-file", "aria-label": "Model file (.npz or .onnx)" });
  const metric = h("input", { id: "metric-name", value: "accuracy", size: 10, "aria-label": "Metric" });
  const value = h("input", { id: "metric-value", size: 8, placeholder: "0.97", "aria-label": "Declared value" });
  const evalFile = h("input", { type: "file", id: "eval-file", "aria-label": "Evaluation CSV" });
  const upload = () =>
    act(
      ui,
      async () => {
        const f = file.files[0];
        if (!f) throw new Error("choose a model file");
        const fmt = f.name.endsWith(".onnx") ? "onnx" : "npz";
        const v = await api(`${base}/versions`, { method: "POST", params: { format: fmt }, body: f });
        if (value.value.trim()) {
          const body = { metrics: { [metric.value.trim()]: Number(value.value) } };
          if (evalFile.files[0]) body.evaluation = parseCsv(await evalFile.files[0].text());
          await api(`${base}/versions/${v.number}/metadata`, { method: "PUT", body });
        }
      },
      "version uploaded and validated",
    );
  return h(
    "section",
    { class: "panel", id: "upload" },
    h("h3", {}, "Upload a version"),
    h(
      "p",
      {},
      file,
      " metric ",
      metric,
      " = ",
      value,
      " measured on ",
      evalFile,
      " ",
      h("button", { type: "button", id: "upload-version", onclick: upload }, "Upload"),
    ),
  );
}

// Create a draft offering (provider), then open it.
export function newOfferingPanel(ui) {
  const { h, api } = ui;
  const name = h("input", { id: "new-name", placeholder: "name", "aria-label": "Name" });
  const task = h("input", { id: "new-task", value: "binary-classification", "aria-label": "Task" });
  const vis = h(
    "select",
    { id: "new-visibility", "aria-label": "Visibility" },
    ["public", "organisation", "shared"].map((v) => h("option", { value: v }, v)),
  );
  const create = async () => {
    try {
      const o = await api("/v1/offerings", {
        method: "POST",
        body: { name: name.value.trim(), task: task.value.trim(), hosting: "marketplace", visibility: vis.value },
      });
      location.hash = `#/offering/${encodeURIComponent(o.id)}`;
    } catch (e) {
      ui.flash(e.message);
    }
  };
  return h(
    "section",
    { class: "panel", id: "new-offering" },
    h("h3", {}, "New offering"),
    h(
      "p",
      {},
      name,
      " task ",
      task,
      " visibility ",
      vis,
      " ",
      h("button", { type: "button", id: "create-offering", onclick: create }, "Create draft"),
    ),
  );
}

// Teams of the caller's organisation (root keys manage them).
export async function teamsView(ui) {
  const { h, api, table } = ui;
  const teams = await api("/v1/teams");
  const name = h("input", { id: "team-name", placeholder: "team name", "aria-label": "Team name" });
  return [
    h("h2", {}, "Teams"),
    h(
      "section",
      { class: "panel" },
      teams.length
        ? table(
            ["Team", "Id", "Members", ""],
            teams.map((t) => {
              const key = h("input", {
                class: "member-key",
                placeholder: "key_...",
                "aria-label": `Key to add to ${t.name}`,
              });
              return h(
                "tr",
                { "data-team": t.name },
                h("td", {}, t.name),
                h("td", {}, h("code", {}, t.id)),
                h(
                  "td",
                  {},
                  t.members.map((m) =>
                    h(
                      "span",
                      { class: "member" },
                      h("code", {}, m),
                      " ",
                      h(
                        "button",
                        {
                          type: "button",
                          class: "link remove-member",
                          "aria-label": `Remove ${m}`,
                          onclick: () =>
                            act(
                              ui,
                              () =>
                                api(`/v1/teams/${encodeURIComponent(t.id)}/members/${encodeURIComponent(m)}`, {
                                  method: "DELETE",
                                }),
                              `removed ${m}`,
                            ),
                        },
                        "×",
                      ),
                      " ",
                    ),
                  ),
                ),
                h(
                  "td",
                  {},
                  key,
                  " ",
                  h(
                    "button",
                    {
                      type: "button",
                      class: "add-member",
                      onclick: () =>
                        act(
                          ui,
                          () =>
                            api(`/v1/teams/${encodeURIComponent(t.id)}/members`, {
                              method: "POST",
                              body: { member_id: key.value.trim() },
                            }),
                          "member added",
                        ),
                    },
                    "Add",
                  ),
                ),
              );
            }),
            "teams",
          )
        : h("p", { class: "empty" }, "No teams yet."),
      h(
        "p",
        {},
        name,
        " ",
        h(
          "button",
          {
            type: "button",
            id: "create-team",
            onclick: () =>
              act(ui, () => api("/v1/teams", { method: "POST", body: { name: name.value.trim() } }), "team created"),
          },
          "Create team",
        ),
      ),
    ),
  ];
}
