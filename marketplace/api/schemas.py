"""Wire schemas (pydantic) of the foundation routes: XCreate / XUpdate / XPublic.

Every field that is stored and served back is bounded at input: strings by length, JSON values
by depth and size (:mod:`marketplace.api.jsonlimits`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from marketplace.api.jsonlimits import BoundedJson
from marketplace.db.models import Hosting, KeyKind, OfferingStatus

T = TypeVar("T")

Role = Literal["provider", "consumer", "compliance", "admin"]
#: One tag: short text (a list of them is stored and served back with every offering).
Tag = Annotated[str, Field(min_length=1, max_length=60)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PageOf(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None

    @classmethod
    def build(cls, items: list[Any], total: int, page: Any) -> Self:
        """One page of ``total`` items at ``page.offset``; ``next_offset`` is None on the last page."""
        end = page.offset + len(items)
        return cls(
            items=items, total=total, limit=page.limit, offset=page.offset, next_offset=end if end < total else None
        )


class OrgCreate(Strict):
    name: str = Field(min_length=1, max_length=200)


class OrgPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    created_at: datetime


class KeyCreate(Strict):
    roles: list[Role] = Field(min_length=1)
    name: str = Field(default="", max_length=200)
    ttl_days: int = Field(default=365, ge=1, le=3650)


class KeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    org_id: str
    prefix: str
    roles: list[str]
    name: str
    kind: KeyKind
    offering_ids: list[str] | None = None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="The API key. Shown once; store it now.")


class WhoAmIUser(BaseModel):
    id: str
    email: str
    name: str
    teams: list[str]


class WhoAmI(BaseModel):
    key_id: str
    org_id: str
    org_name: str
    roles: list[str]
    user: WhoAmIUser | None = Field(default=None, description="The SSO user (a session, or the user's personal key).")


class OfferingCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    model_card: str = Field(default="", max_length=200_000, description="Markdown.")
    task: str = Field(min_length=1, max_length=60, examples=["binary-classification"])
    input_schema: BoundedJson = Field(default_factory=dict, description="JSON Schema; at most 32 deep, 64 KiB.")
    output_schema: BoundedJson = Field(default_factory=dict, description="JSON Schema; at most 32 deep, 64 KiB.")
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    licence: str = Field(default="proprietary", max_length=100)
    hosting: Hosting = Hosting.MARKETPLACE
    visibility: Literal["public", "organisation", "shared"] = "public"


class OfferingUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    model_card: str | None = Field(default=None, max_length=200_000)
    task: str | None = Field(default=None, min_length=1, max_length=60)
    input_schema: BoundedJson | None = None
    output_schema: BoundedJson | None = None
    tags: list[Tag] | None = Field(default=None, max_length=32)
    licence: str | None = Field(default=None, max_length=100)


class VersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    offering_id: str
    number: int
    format: str
    digest: str
    size: int
    input_shape: list[int]
    info: dict[str, Any]
    he_plan: dict[str, Any] | None = None
    he_report: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None  # declared metrics, notes, parent (docs/sharing.md)
    validation: dict[str, Any] | None = None  # the validation report
    created_at: datetime


class OfferingPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    org_id: str
    name: str
    description: str
    model_card: str
    task: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    tags: list[str]
    licence: str
    hosting: Hosting
    status: OfferingStatus
    visibility: str = "public"
    created_at: datetime
    updated_at: datetime
    latest_version: VersionPublic | None = None
    agent_online: bool | None = None


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    seq: int
    time: datetime
    actor: str
    org_id: str | None
    action: str
    target: str
    outcome: str
    request_id: str
    detail: dict[str, Any]
