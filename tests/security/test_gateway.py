"""Attacks on the inference gateway, each against a real server (uvicorn on loopback).

No contract, a contract without the gateway mode, another organisation's key or contract, an
agent or provider key, no key; a batch over the contract's max_batch or the gateway's row cap;
malformed CSV and JSON; NaN and infinities; quota exhaustion and the rate limit under
concurrency (never an over-charge); an agent answering requests it was not given. Every refusal
is a 4xx JSON error that names rows and columns, never the values, and carries Server-Timing.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.marketplace.test_gateway_support import (
    features,
    gw_offering,
    served,
    to_csv,
    usage_states,
    used_units,
)

SECRET = "31337.4242"  # noqa: S105 - not a password: a value that must never appear in an error message


@pytest.fixture
def gw(tmp_path: Path, db_url: str) -> Iterator[tuple[Any, str]]:
    with served(tmp_path, db_url) as out:
        yield out


@pytest.fixture
def sgw(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Any, str]]:
    with served(tmp_path, sqlite_url, max_request_bytes=256 << 10) as out:
        yield out


def _post(
    url: str, key: str | None, off: str, body: bytes, ctype: str = "application/json", **headers: str
) -> httpx.Response:
    h = {"Content-Type": ctype, "Idempotency-Key": str(uuid.uuid4()), **headers}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}/v1/offerings/{off}/predict", content=body, headers=h, timeout=30)


def _rows(x: Any) -> bytes:
    return json.dumps({"rows": np.asarray(x).tolist()}).encode()


def _err(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert "server-timing" in r.headers and "total;dur=" in r.headers["server-timing"]
    body = r.json()
    assert set(body["error"]) >= {"code", "message"}
    return dict(body["error"])


def test_no_contract_foreign_org_and_wrong_mode_are_refused(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    g = gw_offering(w, tmp_path)  # the consumer's gateway contract
    x = _rows(features(2))
    # another consumer org without a contract: 404, like every object it may not use
    e = _err(_post(url, w.keys["other_consumer"], g.offering_id, x), 404)
    assert "no contract" in e["message"]
    # ... naming the consumer's contract does not help
    _err(_post(url, w.keys["other_consumer"], g.offering_id, x, **{"X-Som-Contract": g.contract_id or ""}), 404)
    # a contract without the gateway mode: 403 mode_not_allowed (audited), nothing reserved
    he_only = gw_offering(w, tmp_path, modes=frozenset({"he_inference", "remote_job"}))
    e = _err(_post(url, w.keys["consumer"], he_only.offering_id, x), 403)
    assert e["code"] == "policy_denied" and e["reason"] == "mode_not_allowed"
    assert usage_states(w.rt, he_only.contract_id or "") == []
    denied = w.admin.paginate("/v1/audit", action="authz.denied", target=he_only.contract_id)
    assert [d["detail"]["reason"] for d in denied] == ["mode_not_allowed"]
    # an unpublished offering of another org is invisible
    hidden = w.other_provider.create_offering(name="hidden", task="binary-classification", hosting="marketplace")
    _err(_post(url, w.keys["consumer"], hidden["id"], x), 404)
    _err(_post(url, w.keys["consumer"], "off_doesnotexist", x), 404)
    # no key, a bad key, a provider key, an agent key
    _err(_post(url, None, g.offering_id, x), 401)
    _err(_post(url, "som_abc_def", g.offering_id, x), 401)
    _err(_post(url, w.keys["provider"], g.offering_id, x), 403)
    st = gw_offering(w, tmp_path, hosting="provider")
    agent_key = w.provider.create_agent_key([st.offering_id])["key"]
    assert _post(url, agent_key, st.offering_id, x).status_code == 403
    assert usage_states(w.rt, g.contract_id or "") == []


def test_batch_limits(sgw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = sgw
    g = gw_offering(w, tmp_path, max_batch=8)
    key = w.keys["consumer"]
    e = _err(_post(url, key, g.offering_id, _rows(features(9))), 403)  # over the contract's max_batch
    assert e["reason"] == "batch_too_large"
    assert _post(url, key, g.offering_id, _rows(features(8))).status_code == 200
    # over the gateway's own cap: refused before any reservation
    e = _err(_post(url, key, g.offering_id, _rows(np.zeros((10_001, 1)))), 422)
    assert "10000" in e["message"]
    # over the body limit: 413 while streaming
    big = b'{"rows": [' + b",".join([b"[0.1,0.2,0.3,0.4,0.5,0.6]"] * 20_000) + b"]}"
    assert _post(url, key, g.offering_id, big).status_code == 413
    # the wrong width names the counts
    e = _err(_post(url, key, g.offering_id, _rows(np.zeros((2, 5)))), 422)
    assert "5 columns" in e["message"] and "takes 6" in e["message"]
    assert usage_states(w.rt, g.contract_id or "") == [("charged", 8)]


CSV_CASES = [
    (f"1,2,3,4,5,6\n1,2,{SECRET},4,5\n".encode(), "line 2"),  # ragged
    (f"1,2,3,4,5,6\n1,{SECRET},abc,4,5,6\n".encode(), "line 2, column 3"),  # not a number
    (f"{SECRET},2,3,4,5,nan\n".encode(), "line 1, column 6"),
    (f"{SECRET},2,3,4,5,inf\n".encode(), "line 1, column 6"),
    (f"{SECRET},2,3,4,5,-Infinity\n".encode(), "line 1, column 6"),
    (b"\xff\xfe" + SECRET.encode() + b",1\n", "UTF-8"),
    (f'1,2,3,4,5,"{SECRET}\n'.encode(), ""),  # an unterminated quote: a cell that is no number
    (f"1,2,3\x00,4,5,{SECRET}\n".encode(), "NUL"),
    (b"\n\n  \n", "no rows"),
    (b"a,b,c,d,e,f\n", "no rows"),  # a header only
]


def test_malformed_csv_is_422_naming_the_place_not_the_value(sgw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = sgw
    g = gw_offering(w, tmp_path)
    for body, where in CSV_CASES:
        e = _err(_post(url, w.keys["consumer"], g.offering_id, body, "text/csv"), 422)
        assert where in e["message"] and SECRET not in json.dumps(e) and "abc" not in e["message"], (body[:40], e)
    assert usage_states(w.rt, g.contract_id or "") == []


JSON_CASES = [
    (b'{"rows": [[1, 2, 3, 4, 5, NaN]]}', "NaN"),
    (b'{"rows": [[1, 2, 3, 4, 5, Infinity]]}', "Infinity"),
    (b'{"rows": [[31337.4242, 2, 3, 4, 5, 1e400]]}', "rows[0][5]"),
    (b'{"rows": [[31337.4242, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, -1e999]]}', "rows[1][5]"),
    (b'{"rows": [[31337.4242, "7", 3, 4, 5, 6]]}', "rows[0][1]"),
    (b'{"rows": [[31337.4242, true, 3, 4, 5, 6]]}', "rows[0][1]"),
    (b'{"rows": [[31337.4242, null, 3, 4, 5, 6]]}', "rows[0][1]"),
    (b'{"rows": [[1, 2, 3, 4, 5, 6], [31337.4242]]}', "rows[1]"),
    (b'{"rows": []}', "non-empty"),
    (b'{"rows": [[1,2,3,4,5,6]], "extra": 1}', "exactly one key"),
    (b'{"inputs": {"a": 31337.4242}}', "exactly one key"),
    (b'{"rows": [[1,2,3,4,5,6]', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, ""),
    (b'{"rows": [[' + b"9" * 5000 + b", 2, 3, 4, 5, 6]]}", "number"),
]


def test_malformed_json_nan_and_infinities_are_422(sgw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = sgw
    g = gw_offering(w, tmp_path)
    for body, where in JSON_CASES:
        e = _err(_post(url, w.keys["consumer"], g.offering_id, body), 422)
        assert where in e["message"] and SECRET not in json.dumps(e), (body[:40], e)
    assert usage_states(w.rt, g.contract_id or "") == []


def test_unsupported_media_type_is_415(sgw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = sgw
    g = gw_offering(w, tmp_path)
    _err(_post(url, w.keys["consumer"], g.offering_id, to_csv(features(1)), "application/octet-stream"), 415)
    _err(_post(url, w.keys["consumer"], g.offering_id, b"<rows/>", "application/xml"), 415)


def test_quota_exhausted_under_concurrency_never_overcharges(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    g = gw_offering(w, tmp_path, quota=10)
    key = w.keys["consumer"]
    n = 20
    statuses: list[int] = [0] * n
    reasons: list[str] = [""] * n
    barrier = threading.Barrier(n)

    def call(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            r = c.post(
                f"{url}/v1/offerings/{g.offering_id}/predict",
                content=_rows(features(1, seed=i)),
                headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": str(uuid.uuid4()),
                },
            )
            statuses[i] = r.status_code
            if r.status_code != 200:
                reasons[i] = r.json()["error"].get("reason", "")

    ts = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert statuses.count(200) == 10
    assert sorted(set(reasons) - {""}) == ["quota_exhausted"] and statuses.count(403) == 10
    assert used_units(w.rt, g.contract_id or "") == (10, 0)
    assert usage_states(w.rt, g.contract_id or "") == [("charged", 1)] * 10
    # and a larger request than what is left is refused whole
    e = _err(_post(url, key, g.offering_id, _rows(features(2))), 403)
    assert e["reason"] == "quota_exhausted"


def test_rate_limit_is_429_with_retry_after(sgw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = sgw
    g = gw_offering(w, tmp_path, rate=3)
    key = w.keys["consumer"]
    assert _post(url, key, g.offering_id, _rows(features(3))).status_code == 200
    r = _post(url, key, g.offering_id, _rows(features(1)))
    e = _err(r, 429)
    assert e["reason"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    assert used_units(w.rt, g.contract_id or "") == (3, 0)


def test_an_agent_cannot_answer_requests_it_was_not_given(sgw: tuple[Any, str], tmp_path: Path) -> None:
    from crypto.sealing import SealKeyPair

    w, url = sgw
    mine = gw_offering(w, tmp_path, hosting="provider")
    theirs = gw_offering(w, tmp_path, hosting="provider", contract=False)

    def agent(off: str) -> tuple[httpx.Client, dict[str, str]]:
        k = w.provider.create_agent_key([off])["key"]
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=30)
        aid = c.post(
            "/v1/agent/hello", json={"seal_public": SealKeyPair.generate().public_text(), "capabilities": ["gateway"]}
        ).json()["id"]
        return c, {"X-Som-Agent": aid}

    good, gh = agent(mine.offering_id)
    evil, eh = agent(theirs.offering_id)
    # another key's agent id is not ours
    assert evil.post("/v1/agent/gateway/exchange", json={"wait": 0}, headers=gh).status_code == 404
    good.post(
        "/v1/agent/gateway/exchange",
        json={"wait": 0, "input_dims": {mine.offering_id: 6, theirs.offering_id: 1}},
        headers=gh,
    )
    result: dict[str, Any] = {}

    def consumer() -> None:
        result["r"] = _post(url, w.keys["consumer"], mine.offering_id, _rows(features(2)))

    t = threading.Thread(target=consumer)
    t.start()
    took = good.post("/v1/agent/gateway/exchange", json={"wait": 10}, headers=gh).json()["requests"]
    assert len(took) == 1 and took[0]["offering_id"] == mine.offering_id and len(took[0]["rows"]) == 2
    assert set(took[0]) == {"id", "offering_id", "rows"}  # nothing about the consumer
    rid = took[0]["id"]
    # the other offering's agent cannot answer it (not given to it), nor take it
    out = evil.post(
        "/v1/agent/gateway/exchange", json={"answers": [{"id": rid, "outputs": [[0.0], [0.0]]}], "wait": 0}, headers=eh
    ).json()
    assert out == {"accepted": 0, "requests": []}
    # a malformed answer (wrong number of rows) fails the call cleanly: 503, released
    out = good.post(
        "/v1/agent/gateway/exchange", json={"answers": [{"id": rid, "outputs": [[0.5]]}], "wait": 0}, headers=gh
    ).json()
    assert out["accepted"] == 1
    t.join(timeout=30)
    _err(result["r"], 503)
    assert usage_states(w.rt, mine.contract_id or "") == [("released", 2)]
    # an answer for a request already finished is ignored
    out = good.post(
        "/v1/agent/gateway/exchange", json={"answers": [{"id": rid, "outputs": [[0.5], [0.5]]}], "wait": 0}, headers=gh
    ).json()
    assert out["accepted"] == 0
    # the width announced for an offering this agent does not serve is ignored
    from marketplace.services.gateway_hub import hub_of

    assert hub_of(w.rt).input_dim(theirs.offering_id) is None
    # a user key cannot speak the agent's gateway protocol
    r = httpx.post(
        f"{url}/v1/agent/gateway/exchange",
        json={"wait": 0},
        headers={"Authorization": f"Bearer {w.keys['provider']}", "X-Som-Agent": gh["X-Som-Agent"]},
    )
    assert r.status_code == 403
    good.close()
    evil.close()
