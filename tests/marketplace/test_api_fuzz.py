"""Bad input never gets a 500: every operation of the OpenAPI document, fuzzed as every role.

schemathesis generates requests from the app's own OpenAPI document (schema-valid ones and
schema-violating ones); each is sent, in process, to the real app (SQLite, seeded with orgs, keys
for every role, offerings with a version, offers, contracts, an agent, a job) as each role, with no
key and with a bad key. Every response must be:

- not a 5xx (``not_a_server_error``; the app's own 500 counter must stay at zero too);
- a documented status code, with the documented content type and a body matching the documented
  schema (schemathesis' conformance checks);
- for every 4xx, the error shape ``{"error": {"code", "message"}}``.

Path, query and header parameters that name objects are sometimes replaced by real ids, so the
fuzzer reaches past the 404s into the handlers; octet-stream bodies also get random bytes.
Afterwards the ledger must still be whole: gapless indexes, and ``som ledger verify`` passes on an
export of the fuzzed app.

Bounded and deterministic: a few examples per (operation, caller), derandomized, no shrinking,
a read timeout per request, and the agent's long-poll capped at a fraction of a second.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.python import asgi
from sqlalchemy import func, select
from typer.testing import CliRunner

from crypto.sealing import SealKeyPair
from marketplace.services import ledger, metering
from marketplace.services.identity import Principal
from tests.conftest import build_world, make_settings
from tests.marketplace.test_jobs_support import Setup, agent_key, offering

pytestmark = pytest.mark.slow

#: Examples per (operation, caller, generation mode). Callers without a valid key get fewer: the
#: answer is a 401 before any input is looked at.
EXAMPLES_WITH_KEY = 4
EXAMPLES_WITHOUT_KEY = 1
READ_TIMEOUT = 10.0  # seconds; a request taking longer is a hang
ROLES = ("admin", "provider", "consumer", "compliance", "agent")
ANONYMOUS = ("no key", "bad key")

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@dataclass
class Fuzzed:
    world: Any
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    by_operation: dict[str, set[int]] = field(default_factory=dict)


def _seed(world: Any, tmp_path: Path) -> tuple[dict[str, str], dict[str, list[Any]]]:
    """Objects of every kind; returns (caller -> Authorization header value, param name -> real values)."""
    hosted: Setup = offering(world, tmp_path / "m", hosting="marketplace")
    remote: Setup = offering(world, tmp_path / "p", hosting="provider")
    draft = world.other_provider.create_offering(name="draft", task="regression", hosting="marketplace")
    job = world.consumer.create_job(hosted.offering_id, "predict", units=1, idempotency_key="fuzz-seed-job")
    akey = agent_key(world, remote.offering_id)
    hello = world.client(akey).post_json("/v1/agent/hello", {"seal_public": SealKeyPair.generate().public_text()})
    spare = world.admin.create_key(world.orgs["other_consumer"], ["consumer"], name="spare")
    # one charged and one released use, so the ledger holds usage leaves the fuzzer must not disturb
    consumer = Principal(key_id="key_fuzz_seed", org_id=world.orgs["consumer"], roles=frozenset({"consumer"}))
    uses = []
    for key in ("fuzz-seed-charged", "fuzz-seed-released"):
        r = metering.begin(
            world.rt, consumer, offering_id=remote.offering_id, mode="remote_job", units=2,
            idempotency_key=key, request_digest=metering.request_digest(key),
            contract_id=remote.contract_id, job_kind="predict",
        )  # fmt: skip
        if key.endswith("charged"):
            metering.commit(world.rt, r, result=b"sealed", media_type="application/octet-stream")
        else:
            metering.release(world.rt, r, reason="seeded failure")
        uses.append(r.usage_id)
    offers = [o["id"] for oid in (hosted.offering_id, remote.offering_id) for o in world.provider.list_offers(oid)]
    auth = {name: f"Bearer {world.keys[name]}" for name in ROLES if name != "agent"}
    auth["agent"] = f"Bearer {akey}"
    auth["bad key"] = "Bearer som_" + secrets.token_hex(4) + "_" + secrets.token_hex(16)
    ids: dict[str, list[Any]] = {
        "offering_id": [hosted.offering_id, remote.offering_id, draft["id"]],
        "offer_id": offers,
        "contract_id": [hosted.contract_id, remote.contract_id],
        "X-Som-Contract": [hosted.contract_id, remote.contract_id],
        "job_id": [job["id"]],
        "usage_id": uses,
        "work_id": [job["id"]],
        "org_id": list(world.orgs.values()),
        "key_id": [spare["id"]],
        "X-Som-Agent": [hello["id"]],
        "number": [1, 2],
        "index": [0, 1, 2],
        "start": [0],
        "end": [1, 3],
        "size": [1, 3],
        "size1": [1],
        "size2": [3],
    }
    return auth, ids


def _error_shape(status: int, body: bytes, ctype: str) -> str | None:
    """None if a 4xx body has the error shape, else what is wrong with it."""
    if not ctype.startswith("application/json"):
        return f"{status} with content type {ctype!r}"
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:80]!r}"
    err = doc.get("error") if isinstance(doc, dict) else None
    if not (isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
        return f"{status} without the error shape: {body[:200]!r}"
    return None


def _fuzz_operation(fz: Fuzzed, op: Any, auth: dict[str, str], ids: dict[str, list[Any]]) -> None:
    client = asgi.get_client(fz.world.app)  # not entered: no lifespan, no background threads
    binary = "application/octet-stream" in (op.definition.raw.get("requestBody") or {}).get("content", {})

    for caller in (*ROLES, *ANONYMOUS):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_as(fz, op, caller, mode, auth, ids, client, binary)


def _fuzz_as(
    fz: Fuzzed,
    op: Any,
    caller: str,
    mode: GenerationMode,
    auth: dict[str, str],
    ids: dict[str, list[Any]],
    client: Any,
    binary: bool,
) -> None:
    n = EXAMPLES_WITH_KEY if caller in ROLES else EXAMPLES_WITHOUT_KEY

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: Any) -> None:
        for loc, params in (
            ("path", case.path_parameters),
            ("query", case.query),
            ("header", case.headers),
        ):
            if params is None:
                continue
            for name in list(params):
                if name in ids and data.draw(st.booleans(), label=f"real {loc} {name}"):
                    params[name] = str(data.draw(st.sampled_from(ids[name])))
        if binary and data.draw(st.booleans(), label="random bytes"):
            case.body = data.draw(st.binary(max_size=4096), label="body")
            case.media_type = "application/octet-stream"
        if op.path in (
            "/v1/agent/lease",
            "/v1/agent/gateway/exchange",
        ):  # long-polls (20 s by default): keep the run bounded
            if isinstance(case.body, dict):
                case.body["wait"] = 0.05
            elif case.body is None or isinstance(case.body, NotSet):
                case.body, case.media_type = {"wait": 0.05}, "application/json"
        headers = {} if caller == "no key" else {"Authorization": auth[caller]}
        case.headers = {**(case.headers or {}), **headers} if headers else case.headers
        response = case.call(session=client, timeout=READ_TIMEOUT)
        fz.requests += 1
        fz.statuses[response.status_code] = fz.statuses.get(response.status_code, 0) + 1
        fz.by_operation.setdefault(f"{op.method.upper()} {op.path}", set()).add(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if 400 <= response.status_code < 500:
            ctype = (response.headers.get("content-type") or [""])[0]
            problem = _error_shape(response.status_code, response.content, ctype)
            if problem:
                raise AssertionError(problem)

    try:
        run()
    except Unsatisfiable:
        pass  # no schema-violating request exists for an operation that takes no input
    except (Exception, BaseExceptionGroup) as e:  # collected, reported together at the end
        fz.failures.append(f"{op.method.upper()} {op.path} as {caller} ({mode.value}): {e}")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    from marketplace.api.app import create_app

    tmp_path = tmp_path_factory.mktemp("fuzz")
    # Every caller, the "bad key" one included, comes from the same address: with the default
    # failed-authentication throttle the bad key's 401s would lock the valid keys out (429).
    app = create_app(
        make_settings(
            tmp_path,
            f"sqlite:///{tmp_path / 'som.db'}",
            workers=1,
            auth_fail_max_per_client=10**6,
            auth_fail_max_per_prefix=10**6,
        )
    )
    try:
        world = build_world(app)
        auth, ids = _seed(world, tmp_path)
        # The document the app serves at /openapi.json. (``from_asgi`` would also start the app's
        # lifespan, i.e. its background threads, for the rest of the test process.)
        schema = schemathesis.openapi.from_dict(world.http.get("/openapi.json").json())
        schema.app = app
        fz = Fuzzed(world)
        for result in schema.get_all_operations():
            _fuzz_operation(fz, result.ok(), auth, ids)
        yield fz
    finally:
        app.state.runtime.close()


def test_no_operation_answers_a_server_error_or_off_its_schema(fuzzed: Fuzzed) -> None:
    assert fuzzed.requests > 500
    assert not fuzzed.failures, "\n\n".join(fuzzed.failures)
    assert getattr(fuzzed.world.app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    # the fuzzer got past authentication and validation: successes and domain errors were answered
    assert any(200 <= s < 300 for s in fuzzed.statuses), fuzzed.statuses
    assert {401, 403, 404, 409, 422} <= set(fuzzed.statuses), fuzzed.statuses
    reached = [op for op, seen in fuzzed.by_operation.items() if any(200 <= s < 300 for s in seen)]
    assert len(reached) >= 30, fuzzed.by_operation  # real ids got it past the 404s, into handlers


def test_the_ledger_is_whole_after_the_fuzzing(fuzzed: Fuzzed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import marketplace.cli.cmd_ledger as cmd
    from marketplace.cli import app as cli
    from marketplace.db.models_contracts import UsageRow
    from marketplace.db.models_ledger import LedgerLeaf

    rt = fuzzed.world.rt
    with rt.tx() as s:
        size = ledger.tree_size(s)
        indexes = list(s.scalars(select(LedgerLeaf.idx).order_by(LedgerLeaf.idx)))
        final = dict(s.execute(select(UsageRow.id, UsageRow.state).where(UsageRow.state != "reserved")).all())
        n_events = s.scalar(select(func.count()).select_from(LedgerLeaf).where(LedgerLeaf.schema == "som.audit/v1"))
    assert indexes == list(range(size))  # gapless, no duplicates
    records = [json.loads(data) for _, data in ledger.iter_leaves(rt, 0, size)]
    usage = [r["usage_id"] for r in records if r["schema"] == "som.usage/v1"]
    assert sorted(usage) == sorted(final)  # every finished use has exactly one leaf, nothing else
    assert {"charged", "released"} <= set(final.values())
    assert n_events and n_events > 100  # the fuzzing's denials and failed logins were recorded

    monkeypatch.setattr(cmd, "client", lambda ctx, need_key=True: fuzzed.world.compliance)
    runner = CliRunner()
    fuzzed.world.compliance.sign_ledger_checkpoint()
    out = tmp_path / "export"
    r = runner.invoke(cli, ["ledger", "export", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    vkey = fuzzed.world.compliance.ledger_key()  # the officer's key, obtained out of band
    r = runner.invoke(cli, ["--json", "ledger", "verify", str(out), "--vkey", vkey], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with rt.tx() as s:
        assert json.loads(r.output)["leaves"] == ledger.tree_size(s) >= size
