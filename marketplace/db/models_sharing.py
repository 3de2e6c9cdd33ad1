"""Sharing tables: teams of an organisation, their members (API keys or users), and grants.

For: who may read, write or administer an offering (:mod:`marketplace.services.sharing`).
Not for: the offering itself (``offerings.visibility`` lives on the foundation table) or offers
(``offers.addressed_to`` lives on the contracts table).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base, UTCDateTime, new_id, utcnow

__all__ = ["Grant", "Team", "TeamMember"]


class Team(Base):
    """A team of one organisation (unique name within it)."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("team"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_teams_org_name"),)


class TeamMember(Base):
    """A principal (an API key id, or a user id) in a team."""

    __tablename__ = "team_members"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Grant(Base):
    """A permission (read | write | admin) on one offering for an organisation or one of its teams."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("grt"))
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)  # the grantee organisation
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)
    permission: Mapped[str] = mapped_column(String(10))
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("offering_id", "org_id", "team_id", name="uq_grants_grantee"),)
