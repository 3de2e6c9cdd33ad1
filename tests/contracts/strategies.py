"""Hypothesis strategies shared by the ``contracts`` tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from contracts.offer import Contract, accept_offer, make_offer
from contracts.policy import UseRequest
from contracts.terms import JOB_KINDS, MODES, JobLimits, Terms
from crypto.signing import SigningKey

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32

# A few fixed keys: generating Ed25519 keys is cheap, but shrinking over key bytes is pointless.
PROVIDER_KEY = SigningKey.from_private_bytes(bytes(range(32)))
CONSUMER_KEY = SigningKey.from_private_bytes(bytes(range(32, 64)))
OTHER_KEY = SigningKey.from_private_bytes(bytes(range(64, 96)))

signing_keys = st.binary(min_size=32, max_size=32).map(SigningKey.from_private_bytes)

utc_datetimes = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))

ids = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")),
    min_size=1,
    max_size=40,
).filter(str.isprintable)

currencies = st.sampled_from(["EUR", "USD", "JPY", "KWD", "CHF"])


def _nonempty_subset(items: tuple[str, ...]) -> st.SearchStrategy[frozenset[str]]:
    return st.sets(st.sampled_from(items), min_size=1).map(frozenset)


job_limits = st.builds(
    JobLimits,
    allowed_kinds=st.sets(st.sampled_from(JOB_KINDS)).map(frozenset),
    cpu_seconds=st.integers(1, 10**6),
    memory_mb=st.integers(1, 10**6),
    wall_seconds=st.integers(1, 10**6),
)


@st.composite
def terms(
    draw: st.DrawFn,
    *,
    valid_from: datetime | None = None,
    quota: st.SearchStrategy[int] = st.integers(0, 10**12),
    rate: st.SearchStrategy[int] = st.integers(1, 10**6),
    window: st.SearchStrategy[int] = st.integers(1, 86_400),
    price: st.SearchStrategy[int] = st.integers(0, 10**6),
    length: st.SearchStrategy[timedelta] = st.timedeltas(
        min_value=timedelta(microseconds=1), max_value=timedelta(days=3650)
    ),
    modes: st.SearchStrategy[frozenset[str]] = _nonempty_subset(MODES),
    limits: st.SearchStrategy[JobLimits] = job_limits,
) -> Terms:
    vf = draw(utc_datetimes) if valid_from is None else valid_from
    length_ = draw(length)
    return Terms(
        modes=draw(modes),
        quota_units=draw(quota),
        rate_units=draw(rate),
        rate_window_seconds=draw(window),
        valid_from=vf,
        valid_until=vf + length_,
        unit_price_minor=draw(price),
        currency=draw(currencies),
        max_batch=draw(st.integers(1, 10_000)),
        job_limits=draw(limits),
    )


def small_terms(**kw: object) -> st.SearchStrategy[Terms]:
    """Terms where quota, rate and batch limits are reachable in a short simulation."""
    return terms(
        valid_from=T0,
        quota=st.integers(0, 300).map(lambda q: 300 - q),  # shrinks towards a usable quota
        rate=st.integers(1, 40).map(lambda r: 41 - r),
        window=st.integers(1, 30),
        price=st.integers(0, 1000),
        length=st.timedeltas(min_value=timedelta(minutes=5), max_value=timedelta(days=30)),
        modes=st.just(frozenset(MODES)) | _nonempty_subset(MODES),
        limits=st.just(JobLimits(frozenset(JOB_KINDS), 60, 256, 60)) | job_limits,
        **kw,  # type: ignore[arg-type]
    )


@st.composite
def contracts(draw: st.DrawFn, *, terms_strategy: st.SearchStrategy[Terms] | None = None) -> Contract:
    t = draw(terms() if terms_strategy is None else terms_strategy)
    created = t.valid_from - draw(st.timedeltas(timedelta(0), timedelta(days=30)))
    offer = make_offer(
        offer_id=draw(ids),
        offering_id=draw(ids),
        provider_org=draw(ids),
        terms=t,
        signing_key=PROVIDER_KEY,
        now=created,
    )
    return accept_offer(
        offer,
        consumer_org=draw(ids),
        signing_key=CONSUMER_KEY,
        now=created + draw(st.timedeltas(timedelta(0), timedelta(days=1))),
    )


@st.composite
def use_requests(draw: st.DrawFn, *, max_units: int = 50) -> UseRequest:
    mode = draw(st.sampled_from(MODES))
    units = draw(st.integers(1, max_units))
    return UseRequest(
        mode=mode,
        units=units,
        batch_size=draw(st.integers(1, max(units, 1))),
        job_kind=draw(st.sampled_from(JOB_KINDS)) if mode == "remote_job" else None,
        keyset_id=draw(st.sampled_from(["k1", "k2"])) if mode == "he_inference" else None,
    )
