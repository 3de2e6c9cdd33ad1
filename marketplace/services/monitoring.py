"""Monitoring hooks (placeholder: the monitoring feature owns the real module).

For: the gateway (and later the other modes) reporting each inference call. This placeholder
keeps the gateway's call site and signature stable until the monitoring work is merged.
"""

from __future__ import annotations

__all__ = ["record_inference"]


def record_inference(
    offering_id: str,
    version: int,
    mode: str,
    *,
    queue_s: float,
    model_s: float,
    overhead_s: float,
    ok: bool,
    error_class: str | None = None,
) -> None:
    """Record one inference call: where the time went (queue, model, everything else) and its
    outcome (``error_class`` names the failure, e.g. ``"invalid"``, ``"policy_denied"``).

    A no-op here: the monitoring feature replaces this module with metrics and adoption storage.
    """
    return None
