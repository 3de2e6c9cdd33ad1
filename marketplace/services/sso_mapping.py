"""The group mapping file: IdP groups -> organisation, teams and roles (docs/sso.md).

For: deriving, at every login, what a user is from the groups the OpenID Provider says they are in.
A group that appears in no rule gives nothing; a user none of whose groups match is refused, never
given a default role. Not for: storing anything (see :mod:`marketplace.services.sso`).

The file is JSON or TOML (by its suffix)::

    [[groups]]
    group = "ml-engineers"      # the IdP group, exactly as in the groups claim
    org = "acme"                # an existing organisation, by name
    teams = ["ml-platform"]     # teams of that organisation the user joins
    roles = ["provider"]        # roles from ROLES

It is re-read when its modification time or size changes, so an edit applies at the next login.
"""

from __future__ import annotations

import json
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marketplace.services.identity import ROLES

__all__ = ["GroupMap", "GroupMapError", "GroupRule", "Mapped", "load_group_map", "map_groups"]


class GroupMapError(ValueError):
    """The mapping file is unreadable or malformed."""


@dataclass(frozen=True)
class GroupRule:
    group: str
    org: str
    teams: tuple[str, ...]
    roles: tuple[str, ...]


@dataclass(frozen=True)
class GroupMap:
    rules: tuple[GroupRule, ...]


@dataclass(frozen=True)
class Mapped:
    """What the groups give: one organisation (by name), its teams, the roles; or why not."""

    org: str | None
    teams: tuple[str, ...]
    roles: tuple[str, ...]
    matched: tuple[str, ...]
    refusal: str | None = None  # "unmapped_group" | "several_organisations"


def _strs(value: Any, what: str, i: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise GroupMapError(f"rule {i}: {what} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def parse_group_map(data: Any) -> GroupMap:
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise GroupMapError('the mapping must have a "groups" list of rules')
    rules = []
    for i, r in enumerate(data["groups"]):
        if not isinstance(r, dict):
            raise GroupMapError(f"rule {i}: must be a table/object")
        unknown = set(r) - {"group", "org", "teams", "roles"}
        if unknown:
            raise GroupMapError(f"rule {i}: unknown keys {sorted(unknown)}")
        group, org = r.get("group"), r.get("org")
        if not isinstance(group, str) or not group or not isinstance(org, str) or not org.strip():
            raise GroupMapError(f"rule {i}: group and org must be non-empty strings")
        roles = _strs(r.get("roles", []), "roles", i)
        bad = [x for x in roles if x not in ROLES]
        if bad:
            raise GroupMapError(f"rule {i}: unknown roles {bad}; roles are {list(ROLES)}")
        teams = _strs(r.get("teams", []), "teams", i)
        if not roles and not teams:
            raise GroupMapError(f"rule {i}: a rule must give roles or teams")
        rules.append(GroupRule(group=group, org=org.strip(), teams=teams, roles=roles))
    return GroupMap(rules=tuple(rules))


_cache: dict[Path, tuple[tuple[int, int], GroupMap]] = {}
_lock = threading.Lock()


def load_group_map(path: Path) -> GroupMap:
    """The mapping in ``path``, parsed once per (mtime, size)."""
    try:
        st = path.stat()
    except OSError as e:
        raise GroupMapError(f"cannot read the group mapping file {path}: {e}") from e
    stamp = (st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _cache.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode()) if path.suffix.lower() == ".toml" else json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GroupMapError(f"the group mapping file {path} is not valid {path.suffix or 'JSON'}: {e}") from e
    gm = parse_group_map(data)
    with _lock:
        _cache[path] = (stamp, gm)
    return gm


def map_groups(gm: GroupMap, groups: list[str]) -> Mapped:
    """Apply the rules to a user's groups. No match, or matches in two organisations, is a refusal."""
    present = set(groups)
    hits = [r for r in gm.rules if r.group in present]
    if not hits:
        return Mapped(org=None, teams=(), roles=(), matched=(), refusal="unmapped_group")
    orgs = {r.org for r in hits}
    matched = tuple(sorted({r.group for r in hits}))
    if len(orgs) > 1:
        return Mapped(org=None, teams=(), roles=(), matched=matched, refusal="several_organisations")
    roles = tuple(sorted({x for r in hits for x in r.roles}))
    teams = tuple(sorted({t for r in hits for t in r.teams}))
    if not roles:
        return Mapped(org=None, teams=teams, roles=(), matched=matched, refusal="unmapped_group")
    return Mapped(org=hits[0].org, teams=teams, roles=roles, matched=matched)
