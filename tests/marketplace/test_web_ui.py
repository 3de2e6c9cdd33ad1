"""The web UI in a real browser: Debian's Chromium driven by Playwright against uvicorn on loopback.

One server (SQLite) is seeded once for the module: a consumer, a provider with two offerings (one
with a hostile model card), a signed contract with metered usage, and a signed checkpoint. Each
test gets a fresh browser context (empty sessionStorage). The header/redirect/OpenAPI checks use
plain HTTP and run without Chromium.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips
    expect = None

from crypto.signing import SigningKey
from marketplace.sdk import SomAPIError
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.crypto import naive_merkle
from tests.marketplace.models import npz_bytes
from tests.marketplace.test_contracts_support import make_terms

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "transparency-log.json"

HOSTILE_CARD = """# Credit risk scorer

A **logistic regression** over *30 standardized features*, trained on `breast_cancer`.

## Intended use
- Pre-screening of applications
- Not for final decisions

1. Encrypt your features
2. Send them

```
som infer --encrypted credit.npy
```

See [the paper](https://example.org/paper) and [this](javascript:window.__pwned=3) and [rel](/v1/whoami).

<script>window.__pwned = 1</script>
<img src="x" onerror="window.__pwned = 2">
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(w: Any) -> dict[str, Any]:
    """Two offerings, a version with an HE model card, a contract with two charged uses, a checkpoint."""
    from marketplace.db.models import OfferingVersion
    from marketplace.services import metering
    from marketplace.services.identity import Principal

    credit = w.provider.create_offering(
        name="Credit risk LR",
        description="Scores credit applications under encryption.",
        model_card=HOSTILE_CARD,
        task="binary-classification",
        tags=["finance", "tabular"],
        hosting="marketplace",
    )
    v = w.provider.upload_version(
        credit["id"], npz_bytes(np.full((1, 30), 0.1), np.zeros(1)), format="npz", input_shape=[30]
    )
    w.provider.publish(credit["id"])
    report = {
        "depth": 2,
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": [60, 40, 40, 60],
        "security_bits": 128,
        "argmax_agreement": 0.993,
        "max_abs_error_vs_exact": 0.0021,
        "plan_digest": "sha256:" + "ab" * 32,
    }
    with w.rt.tx() as s:
        s.get(OfferingVersion, v["id"]).he_report = report
    churn = w.provider.create_offering(
        name="Churn MLP",
        description="Predicts churn.",
        task="multiclass-classification",
        tags=["retail"],
        hosting="provider",
    )
    w.provider.publish(churn["id"])

    offer = w.provider.publish_offer(credit["id"], make_terms(quota=100, price=25), signing_key=SigningKey.generate())
    contract = w.consumer.accept_offer(offer["id"], signing_key=SigningKey.generate())
    who = Principal(key_id="key_seed", org_id=w.orgs["consumer"], roles=frozenset({"consumer"}))
    for i, units in enumerate((3, 4)):
        r = metering.begin(
            w.rt,
            who,
            offering_id=credit["id"],
            mode="remote_job",
            job_kind="predict",
            units=units,
            idempotency_key=f"seed-{i}",
            request_digest=metering.request_digest(f"seed-{i}"),
        )
        metering.commit(w.rt, r, result=b"sealed", media_type="application/octet-stream")
    # A denial, so the audit trail has more than one outcome.
    with pytest.raises(SomAPIError):
        w.other_consumer.get_contract(contract["id"])
    w.compliance.sign_ledger_checkpoint()
    return {"credit": credit, "churn": churn, "version": v, "contract": contract, "units": 7}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    from marketplace.api.app import create_app

    tmp = tmp_path_factory.mktemp("web")
    app = create_app(make_settings(tmp, f"sqlite:///{tmp / 'som.db'}", checkpoint_interval_seconds=3600))
    w = build_world(app)
    seeded = _seed(w)
    try:
        with serve_in_thread(app) as url:
            yield w, url, seeded
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500"
    finally:
        app.state.runtime.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) as root")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 4" not in m.text else None)
    try:
        yield pg
        assert errors == [], errors
    finally:
        ctx.close()


def sign_in(page: Any, base: str, key: str) -> None:
    page.goto(base + "/")
    page.fill("#api-key", key)
    page.click("#signin button[type=submit]")


# -- plain HTTP: headers, redirects, schema -----------------------------------------------------


def test_ui_is_served_with_security_headers(server: Any) -> None:
    _, base, _ = server
    with httpx.Client(base_url=base) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        assert c.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
        r = c.get("/ui/")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in r.text and 'src="app.js"' in r.text  # no inline script
        for name in ("app.js", "md.js", "merkle.js"):
            js = c.get(f"/ui/{name}")
            assert js.status_code == 200 and "javascript" in js.headers["content-type"], name
            assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(", js.text), name
            assert js.headers["x-content-type-options"] == "nosniff"
        missing = c.get("/ui/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert missing.headers["x-content-type-options"] == "nosniff"
        paths = c.get("/openapi.json").json()["paths"]
        assert paths and all(p.startswith("/v1/") for p in paths)


def test_static_files_ship_as_package_data() -> None:
    """Every file the UI serves is matched by pyproject's package-data, in a real package."""
    import fnmatch
    import tomllib

    from marketplace.api.routes_web import STATIC_DIR

    root = Path(__file__).resolve().parents[2]
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg_dir = STATIC_DIR.parent
    assert (pkg_dir / "__init__.py").is_file()  # package data belongs to a package
    assert any(fnmatch.fnmatch("marketplace.web", pat) for pat in conf["packages"]["find"]["include"])
    patterns = conf["package-data"].get("*", []) + conf["package-data"].get("marketplace.web", [])
    files = [f.relative_to(pkg_dir).as_posix() for f in STATIC_DIR.rglob("*") if f.is_file()]
    assert {"static/index.html", "static/app.js", "static/md.js", "static/merkle.js", "static/style.css"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f"{f} is not package data"


# -- consumer -----------------------------------------------------------------------------------


@pytest.mark.browser
def test_consumer_searches_opens_offering_card_is_safe(page: Any, server: Any, tmp_path: Path) -> None:
    w, base, seeded = server
    sign_in(page, base, w.keys["consumer"])
    page.wait_for_selector("#offerings")
    assert page.url.endswith("/ui/#/catalog")
    assert page.text_content("#who .org") == "consumer-org"
    nav = page.text_content("#nav")
    assert "Contracts" in nav and "Audit" not in nav and "Ledger" not in nav
    # The key is in sessionStorage, never in the address.
    assert page.evaluate("sessionStorage.getItem('som.apiKey')") == w.keys["consumer"]
    assert w.keys["consumer"] not in page.url

    names = page.locator("#offerings li h3").all_text_contents()
    assert sorted(names) == ["Churn MLP", "Credit risk LR"]
    page.fill("#catalog-filters input[name=q]", "credit")
    page.click("#catalog-filters button[type=submit]")
    expect(page.locator("#offerings li")).to_have_count(1)
    assert "q=credit" in page.url
    page.select_option("#catalog-filters select[name=hosting]", "provider")
    page.click("#catalog-filters button[type=submit]")
    page.wait_for_selector("text=No offerings match.")
    page.select_option("#catalog-filters select[name=hosting]", "")
    page.fill("#catalog-filters input[name=q]", "")
    page.fill("#catalog-filters input[name=tag]", "retail")
    page.click("#catalog-filters button[type=submit]")
    expect(page.locator("#offerings li")).to_have_count(1)
    assert page.text_content("#offerings li h3") == "Churn MLP"
    assert "agent offline" in page.text_content("#offerings li")  # provider-hosted, no agent running
    page.goto(base + "/ui/#/catalog?task=binary-classification")
    expect(page.locator("#offerings li h3")).to_have_text(["Credit risk LR"])
    assert "agent" not in page.text_content("#offerings li")  # marketplace-hosted

    page.click("#offerings li h3 a")
    page.wait_for_selector("#model-card")
    card = page.locator("#model-card")
    # Rendered: headings, emphasis, lists, code, an http(s) link.
    assert card.locator("h3").text_content() == "Credit risk scorer"
    assert card.locator("h4").text_content() == "Intended use"
    assert card.locator("strong").text_content() == "logistic regression"
    assert card.locator("em").text_content() == "30 standardized features"
    assert card.locator("ul li").count() == 2 and card.locator("ol li").count() == 2
    assert card.locator("pre code").text_content().strip() == "som infer --encrypted credit.npy"
    links = card.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/paper"
    # Escaped, not executed: the tags are text, no element was created, the flag is unset.
    text = card.text_content()
    assert "<script>window.__pwned = 1</script>" in text and '<img src="x"' in text
    assert card.locator("script, img").count() == 0
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    # Versions with digest, HE model card, agent status.
    assert page.text_content("table.versions") and seeded["version"]["digest"] in page.text_content("table.versions")
    he = page.text_content("#he-card")
    assert "Multiplicative depth" in he and "99.30 %" in he and "8192" in he
    assert "marketplace-hosted" in page.text_content("dl.meta")
    page.screenshot(path=str(tmp_path / "offering.png"), full_page=True)
    if os.environ.get("SOM_UI_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["SOM_UI_SCREENSHOTS"], "offering.png"), full_page=True)


@pytest.mark.browser
def test_consumer_contracts_and_statement_download(page: Any, server: Any) -> None:
    w, base, seeded = server
    sign_in(page, base, w.keys["consumer"])
    page.wait_for_selector("#offerings")
    page.click("#nav >> text=Contracts")
    row = page.locator(f"tr[data-contract='{seeded['contract']['id']}']")
    row.wait_for()
    assert "active" in row.text_content()
    assert f"{seeded['units']} / 100 units used" in row.text_content()
    assert "quota 100 units" in row.text_content()
    with page.expect_download() as dl:
        row.locator("button.statement").click()
    content = Path(dl.value.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(content)))
    charged = [r for r in rows if r.get("outcome") == "charged"]
    assert sum(int(r["units"]) for r in charged) == seeded["units"]
    assert {r["contract_id"] for r in charged} == {seeded["contract"]["id"]}


@pytest.mark.browser
def test_wrong_key_shows_the_api_message_and_sign_out_forgets_the_key(page: Any, server: Any) -> None:
    w, base, _ = server
    bad = "som_nothere_" + "x" * 32
    want = httpx.get(base + "/v1/whoami", headers={"Authorization": f"Bearer {bad}"}).json()["error"]["message"]
    sign_in(page, base, bad)
    page.wait_for_selector("#signin-error:not([hidden])")
    assert page.text_content("#signin-error") == want
    assert page.evaluate("sessionStorage.getItem('som.apiKey')") is None

    sign_in(page, base, w.keys["consumer"])
    page.wait_for_selector("#offerings")
    # A page the role cannot see shows the API's 403 message, not a blank page.
    page.goto(base + "/ui/#/audit")
    page.wait_for_selector("#view-error")
    assert "compliance" in page.text_content("#view-error")
    page.click("#sign-out")
    page.wait_for_selector("#signin")
    assert page.evaluate("sessionStorage.getItem('som.apiKey')") is None
    assert page.text_content("#nav") == ""


# -- compliance ---------------------------------------------------------------------------------


@pytest.mark.browser
def test_compliance_filters_audit_trail(page: Any, server: Any) -> None:
    w, base, _ = server
    sign_in(page, base, w.keys["compliance"])
    page.wait_for_selector("#offerings")
    nav = page.text_content("#nav")
    assert "Audit trail" in nav and "Ledger" in nav and "Contracts" not in nav
    page.click("#nav >> text=Audit trail")
    page.wait_for_selector("table.audit")
    page.fill("#audit-filters input[name=action]", "offering.create")
    page.click("#audit-filters button[type=submit]")
    want = w.compliance.audit(action="offering.create")
    assert len(want) == 2
    expect(page.locator("table.audit td.action")).to_have_text(["offering.create"] * len(want))
    page.fill("#audit-filters input[name=action]", "")
    page.select_option("#audit-filters select[name=outcome]", "denied")
    page.fill("#audit-filters input[name=org_id]", w.orgs["other_consumer"])
    page.click("#audit-filters button[type=submit]")
    denied = w.compliance.audit(outcome="denied", org_id=w.orgs["other_consumer"])
    assert denied
    expect(page.locator("table.audit td.outcome")).to_have_text(["denied"] * len(denied))
    # A time range that ends before anything happened is empty.
    page.goto(base + "/ui/#/audit?until=2000-01-01T00:00:00.000Z")
    page.wait_for_selector("text=No events match.")
    assert page.input_value("#audit-filters input[name=until]").startswith(("1999-12-31", "2000-01-01"))


@pytest.mark.browser
def test_compliance_ledger_verifies_inclusion_in_the_browser(page: Any, server: Any) -> None:
    w, base, seeded = server
    cp_size = int(w.compliance.ledger_checkpoint().decode().split("\n")[1])
    sign_in(page, base, w.keys["compliance"])
    page.wait_for_selector("#offerings")
    usage = [leaf for leaf in w.compliance.ledger_leaves(0, cp_size) if leaf["record"]["schema"] == "som.usage/v1"]
    assert len(usage) == 2
    page.goto(base + f"/ui/#/ledger?start={usage[0]['index']}")
    page.wait_for_selector("table.leaves")
    assert int(page.text_content("#tree-size")) >= cp_size
    page.wait_for_selector("#checkpoint-signature .verified")
    assert page.text_content("#checkpoint-signature").startswith("✓ signed by")
    totals = page.text_content("table.totals")
    assert seeded["contract"]["id"] in totals and "€1.75" in totals.replace("\u00a0", "")

    idx = usage[0]["index"]
    row = page.locator(f"tr[data-index='{idx}']")
    assert "usage · remote_job · 3 units · charged" in row.text_content()
    row.locator("button.verify").click()
    expect(row.locator(".verify-result")).to_have_text(re.compile("^✓ included"))

    # A tampered proof (one flipped bit, served by an intercepted response) shows ✗.
    def tamper(route: Any) -> None:
        body = route.fetch().json()
        h = bytearray(base64.b64decode(body["proof"][0]))
        h[0] ^= 1
        body["proof"][0] = base64.b64encode(bytes(h)).decode()
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/ledger/proof/inclusion*", tamper)
    other = usage[1]["index"]
    page.locator(f"tr[data-index='{other}'] button.verify").click()
    expect(page.locator(f"tr[data-index='{other}'] .verify-result")).to_have_text(re.compile("^✗"))


@pytest.mark.browser
def test_browser_merkle_code_matches_vectors_and_reference(page: Any, server: Any) -> None:
    """merkle.js against the transparency-dev probes, the C2SP note vectors and the naive reference tree."""
    _, base, _ = server
    page.goto(base + "/ui/")
    vec = json.loads(VECTORS.read_text())
    probes = [dict(p, leaf_hash=p["leaf_hash"], root=p["root"]) for p in vec["inclusion_probes"]]
    leaves = [bytes([i]) * (i % 5) for i in range(13)]
    ref = []
    for n in range(1, len(leaves) + 1):
        for m in range(n):
            ref.append(
                {
                    "index": m,
                    "size": n,
                    "leaf": leaves[m].hex(),
                    "root": naive_merkle.mth(leaves[:n]).hex(),
                    "proof": [p.hex() for p in naive_merkle.path(m, leaves[:n])],
                }
            )
    notes = [{"note": n["note"], "vkey": n["vkey"], "ok": n["expect"].startswith("valid")} for n in vec["signed_notes"]]
    out = page.evaluate(
        """async ([probes, ref, notes]) => {
          const m = await import('/ui/merkle.js');
          const hex = (s) => Uint8Array.from((s ?? '').match(/../g) ?? [], (b) => parseInt(b, 16));
          const res = {probes: [], ref: [], tampered: [], notes: []};
          for (const p of probes) {
            let ok = true;
            try {
              const r = await m.rootFromInclusionProof(p.index, p.size, hex(p.leaf_hash), p.proof.map(hex));
              ok = r.length === 32 && r.every((b, i) => b === hex(p.root)[i]);
            } catch { ok = false; }
            res.probes.push(ok === !p.wantErr);
          }
          for (const t of ref) {
            let ok = true;
            try { await m.verifyInclusion(hex(t.leaf), t.index, t.size, t.proof.map(hex), hex(t.root)); } catch { ok = false; }
            res.ref.push(ok);
            if (t.proof.length) {
              const bad = t.proof.map(hex); bad[bad.length - 1][31] ^= 1;
              let rejected = false;
              try { await m.verifyInclusion(hex(t.leaf), t.index, t.size, bad, hex(t.root)); } catch { rejected = true; }
              res.tampered.push(rejected);
            }
          }
          for (const n of notes) {
            let ok = true;
            try { await m.verifyNoteSignature(n.note, n.vkey); } catch { ok = false; }
            res.notes.push(ok === n.ok);
          }
          return res;
        }""",
        [probes, ref, notes],
    )
    assert out["probes"] and all(out["probes"]), [
        p["desc"] for p, ok in zip(probes, out["probes"], strict=True) if not ok
    ]
    assert len(out["ref"]) == len(ref) and all(out["ref"])
    assert out["tampered"] and all(out["tampered"])
    assert any(n["ok"] for n in notes) and all(out["notes"])


@pytest.mark.browser
def test_markdown_renderer_never_makes_markup_from_text(page: Any, server: Any) -> None:
    _, base, _ = server
    page.goto(base + "/ui/")
    cases = [
        "<b>bold</b>",
        "[x](javascript:alert(1))",
        "[x](data:text/html,<script>alert(1)</script>)",
        "[x](JaVaScRiPt:alert(1))",
        "`<i>code</i>`",
        "**<u>u</u>**",
        "# <h1>h</h1>",
        "- <li>x</li>",
        "[ok](http://a.example/?q=<x>)",
        "<svg onload=alert(1)>",
        "```\n<script>x</script>\n```",
    ]
    out = page.evaluate(
        """async (cases) => {
          const {renderMarkdown} = await import('/ui/md.js');
          const allowed = new Set(['P','H3','H4','H5','H6','H7','H8','UL','OL','LI','PRE','CODE','STRONG','EM','A']);
          return cases.map((src) => {
            const div = document.createElement('div');
            div.append(renderMarkdown(src));
            const tags = [...div.querySelectorAll('*')].map((e) => e.tagName);
            const hrefs = [...div.querySelectorAll('a')].map((a) => a.href);
            const attrs = [...div.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name));
            return {tags, hrefs, attrs, text: div.textContent};
          });
        }""",
        cases,
    )
    for src, r in zip(cases, out, strict=True):
        assert set(r["tags"]) <= {"P", "H3", "H4", "UL", "OL", "LI", "PRE", "CODE", "STRONG", "EM", "A"}, (src, r)
        assert set(r["attrs"]) <= {"href", "rel", "target"}, (src, r)
        assert all(h.startswith(("http://", "https://")) for h in r["hrefs"]), (src, r)
    assert out[0]["text"] == "<b>bold</b>"
    assert out[1]["hrefs"] == [] and out[3]["hrefs"] == []
    assert out[8]["hrefs"] == ["http://a.example/?q=%3Cx%3E"]
    assert "<script>x</script>" in out[10]["text"]
