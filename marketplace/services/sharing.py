"""Who may see and act on an offering: teams, grants, visibility (docs/sharing.md).

One scope decides, and catalog search, :func:`marketplace.services.catalog.get_visible` and
:func:`~marketplace.services.catalog.get_owned` call it instead of checks of their own:

* :func:`readable_clause` is the SQL filter of the offerings a principal may read (search);
* :func:`may` answers one offering and one permission (``read`` < ``write`` < ``admin``).

Reading: the platform admin reads everything; an organisation reads all of its own offerings;
another organisation reads a *published* offering when its visibility is ``public``, or
``shared`` with a grant to that organisation (no team) or to a team the caller's key is in.
Acting (write: upload versions, edit the card; admin: grants, visibility, publish, withdraw,
offers) is for the owner organisation only. There, an offering no team of the owner holds a
grant on is open to every provider key of the organisation (as before teams existed); once a
team of the owner holds one, only keys in a team with the permission (or the organisation's
root keys, those issued by the platform admin) may act on it. Grants to other organisations
carry ``read`` only. Everything a caller may not read is a 404, as if it did not exist.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, false, or_, select, true
from sqlalchemy.orm import Session

from marketplace.db.models import ApiKey, Offering, Org
from marketplace.db.models_sharing import Grant, Team, TeamMember
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound
from marketplace.services import audit
from marketplace.services.identity import Principal

__all__ = [
    "Permission",
    "Visibility",
    "add_grant",
    "add_member",
    "check",
    "check_addressees",
    "create_team",
    "get_team",
    "is_org_root",
    "list_grants",
    "list_teams",
    "may",
    "readable_clause",
    "remove_grant",
    "remove_member",
    "set_visibility",
    "team_ids",
]


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class Visibility(StrEnum):
    PUBLIC = "public"
    ORGANISATION = "organisation"
    SHARED = "shared"


_RANK = {Permission.READ: 1, Permission.WRITE: 2, Permission.ADMIN: 3}


def _member_ids(p: Principal) -> list[str]:
    ids = [p.key_id]
    user = getattr(p, "user_id", None)  # SSO users are principals too (docs/sso.md)
    if user:
        ids.append(str(user))
    return ids


def team_ids(s: Session, p: Principal) -> set[str]:
    """The teams the caller's key (or user) is a member of."""
    return set(s.scalars(select(TeamMember.team_id).where(TeamMember.member_id.in_(_member_ids(p)))))


def is_org_root(s: Session, p: Principal) -> bool:
    """A platform admin, or one of the organisation's root keys (issued from outside the org)."""
    if p.has("admin"):
        return True
    key = s.get(ApiKey, p.key_id)
    if key is None:
        return bool(getattr(p, "user_id", None)) and "admin" in p.roles
    if key.created_by is None:
        return True
    parent = s.get(ApiKey, key.created_by)
    return parent is None or parent.org_id != key.org_id


def readable_clause(s: Session, p: Principal) -> ColumnElement[bool]:
    """SQL filter over :class:`Offering`: the offerings ``p`` may read."""
    if p.has("admin"):
        return true()
    mine = team_ids(s, p)
    granted = select(Grant.offering_id).where(
        Grant.org_id == p.org_id,
        or_(Grant.team_id.is_(None), Grant.team_id.in_(mine) if mine else false()),
    )
    return or_(
        Offering.org_id == p.org_id,
        and_(
            Offering.status == "published",
            or_(
                Offering.visibility == Visibility.PUBLIC.value,
                and_(Offering.visibility == Visibility.SHARED.value, Offering.id.in_(granted)),
            ),
        ),
    )


def _owner_may(s: Session, p: Principal, off: Offering, perm: Permission) -> bool:
    if is_org_root(s, p):
        return True
    own = list(
        s.scalars(
            select(Grant).where(Grant.offering_id == off.id, Grant.org_id == off.org_id, Grant.team_id.is_not(None))
        )
    )
    if not own:
        return True  # no team of the owner restricts it: every provider key of the org (as before)
    mine = team_ids(s, p)
    return any(g.team_id in mine and _RANK[Permission(g.permission)] >= _RANK[perm] for g in own)


def may(s: Session, p: Principal, off: Offering, perm: Permission | str = Permission.READ) -> bool:
    """Whether ``p`` may ``perm`` on ``off`` (see the module docstring)."""
    perm = Permission(perm)
    if perm is Permission.READ:
        return bool(s.scalar(select(Offering.id).where(Offering.id == off.id, readable_clause(s, p))))
    if p.has("admin"):
        return True
    if off.org_id != p.org_id:
        return False
    return _owner_may(s, p, off, perm)


def check(s: Session, p: Principal, offering_id: str, perm: Permission | str = Permission.READ) -> Offering:
    """The offering, if ``p`` may ``perm`` on it. Unreadable: 404; readable but not ``perm``: 403
    for the owner's own keys, 404 for everyone else (both audited as denied)."""
    off = s.get(Offering, offering_id)
    if off is None or not may(s, p, off, Permission.READ):
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    if Permission(perm) is not Permission.READ and not may(s, p, off, perm):
        if off.org_id != p.org_id:
            raise NotFound(f"offering {offering_id} not found", denied=offering_id)
        raise Forbidden(
            f"none of your teams has {Permission(perm).value} permission on offering {offering_id}", denied=offering_id
        )
    return off


# -- teams ------------------------------------------------------------------------------------


def _require_root(s: Session, p: Principal) -> None:
    if not is_org_root(s, p):
        raise Forbidden("only the organisation's root keys manage teams (docs/sharing.md)")


def create_team(s: Session, p: Principal, name: str, who: audit.Actor) -> Team:
    _require_root(s, p)
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise Invalid("team name must be 1..100 printable characters")
    if s.scalar(select(Team).where(Team.org_id == p.org_id, Team.name == name)) is not None:
        raise Conflict(f"your organisation already has a team named {name!r}")
    t = Team(org_id=p.org_id, name=name)
    s.add(t)
    s.flush()
    audit.emit(s, who, "team.create", target=t.id, detail={"name": name})
    return t


def get_team(s: Session, p: Principal, ref: str) -> Team:
    """A team of the caller's organisation, by id or name (others: 404)."""
    t = s.get(Team, ref) or s.scalar(select(Team).where(Team.org_id == p.org_id, Team.name == ref))
    if t is None or (t.org_id != p.org_id and not p.has("admin")):
        raise NotFound(f"team {ref} not found", denied=ref)
    return t


def list_teams(s: Session, p: Principal) -> list[tuple[Team, list[str]]]:
    teams = list(s.scalars(select(Team).where(Team.org_id == p.org_id).order_by(Team.name)))
    return [(t, members(s, t)) for t in teams]


def members(s: Session, t: Team) -> list[str]:
    return list(
        s.scalars(select(TeamMember.member_id).where(TeamMember.team_id == t.id).order_by(TeamMember.member_id))
    )


def add_member(s: Session, p: Principal, team_ref: str, member_id: str, who: audit.Actor) -> Team:
    _require_root(s, p)
    t = get_team(s, p, team_ref)
    key = s.get(ApiKey, member_id)
    if key is None or key.org_id != t.org_id:
        raise NotFound(f"key {member_id} not found in your organisation", denied=member_id)
    if s.get(TeamMember, (t.id, member_id)) is None:
        s.add(TeamMember(team_id=t.id, member_id=member_id))
        s.flush()
        audit.emit(s, who, "team.member.add", target=t.id, detail={"member": member_id})
    return t


def remove_member(s: Session, p: Principal, team_ref: str, member_id: str, who: audit.Actor) -> Team:
    _require_root(s, p)
    t = get_team(s, p, team_ref)
    row = s.get(TeamMember, (t.id, member_id))
    if row is None:
        raise NotFound(f"{member_id} is not a member of team {t.name}")
    s.delete(row)
    s.flush()
    audit.emit(s, who, "team.member.remove", target=t.id, detail={"member": member_id})
    return t


# -- grants and visibility ----------------------------------------------------------------------


def list_grants(s: Session, p: Principal, offering_id: str) -> list[Grant]:
    check(s, p, offering_id, Permission.ADMIN)
    return list(s.scalars(select(Grant).where(Grant.offering_id == offering_id).order_by(Grant.created_at, Grant.id)))


def add_grant(
    s: Session,
    p: Principal,
    offering_id: str,
    *,
    org_id: str | None,
    team_id: str | None,
    permission: str,
    who: audit.Actor,
) -> Grant:
    """Grant ``permission`` to an organisation or a team (replacing that grantee's grant)."""
    off = check(s, p, offering_id, Permission.ADMIN)
    try:
        perm = Permission(permission)
    except ValueError as e:
        raise Invalid(f"permission must be one of {[x.value for x in Permission]}, got {permission!r}") from e
    team = None
    if team_id:
        team = s.get(Team, team_id)
        if team is None or (org_id and team.org_id != org_id):
            raise NotFound(f"team {team_id} not found")
        org_id = team.org_id
    if not org_id:
        raise Invalid("give org_id, team_id or both")
    if s.get(Org, org_id) is None:
        raise NotFound(f"organisation {org_id} not found")
    if org_id == off.org_id and team is None:
        raise Invalid("your own organisation reads its offerings already; grant to one of its teams")
    if org_id != off.org_id and perm is not Permission.READ:
        raise Invalid("other organisations can be granted read only (write and admin stay inside the owner)")
    row = s.scalar(
        select(Grant).where(
            Grant.offering_id == off.id,
            Grant.org_id == org_id,
            Grant.team_id.is_(None) if team is None else Grant.team_id == team.id,
        )
    )
    if row is None:
        row = Grant(
            offering_id=off.id,
            org_id=org_id,
            team_id=team.id if team else None,
            permission=perm.value,
            created_by=p.key_id,
        )
        s.add(row)
    else:
        row.permission = perm.value
    s.flush()
    audit.emit(
        s,
        who,
        "offering.grant",
        target=off.id,
        detail={"grant_id": row.id, "org_id": org_id, "team_id": row.team_id, "permission": perm.value},
    )
    return row


def remove_grant(s: Session, p: Principal, offering_id: str, grant_id: str, who: audit.Actor) -> None:
    off = check(s, p, offering_id, Permission.ADMIN)
    row = s.get(Grant, grant_id)
    if row is None or row.offering_id != off.id:
        raise NotFound(f"grant {grant_id} not found")
    detail: dict[str, Any] = {
        "grant_id": row.id,
        "org_id": row.org_id,
        "team_id": row.team_id,
        "permission": row.permission,
    }
    s.execute(delete(Grant).where(Grant.id == row.id))
    audit.emit(s, who, "offering.revoke", target=off.id, detail=detail)


def set_visibility(s: Session, p: Principal, offering_id: str, visibility: str, who: audit.Actor) -> Offering:
    off = check(s, p, offering_id, Permission.ADMIN)
    try:
        v = Visibility(visibility)
    except ValueError as e:
        raise Invalid(f"visibility must be one of {[x.value for x in Visibility]}, got {visibility!r}") from e
    before = off.visibility
    off.visibility = v.value
    audit.emit(s, who, "offering.visibility", target=off.id, detail={"from": before, "to": v.value})
    return off


def check_addressees(s: Session, org_ids: list[str] | None) -> list[str] | None:
    """The organisation ids a private offer is addressed to (each must exist), or None (anyone)."""
    if org_ids is None:
        return None
    ids = sorted({str(o) for o in org_ids})
    if not ids or len(ids) > 100:
        raise Invalid("a private offer is addressed to 1..100 organisations")
    for o in ids:
        if s.get(Org, o) is None:
            raise Invalid(f"addressed_to: organisation {o} not found")
    return ids
