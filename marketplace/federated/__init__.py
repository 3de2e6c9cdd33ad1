"""Federated training on Flower: a coordinator (ServerApp + SecAgg+) whose messages travel over
the marketplace's HTTP API to participants (ClientApp inside ``som agent``). See docs/federated.md.

Modules: :mod:`learning` (pure numpy logistic regression), :mod:`recipe` (the typed recipe and
participant terms), :mod:`privacy` (the RDP accountant), :mod:`apps` (the Flower apps),
:mod:`transport` (the Grid over the marketplace's mailbox), :mod:`participant` (the agent loop).
"""

import os

# Flower's telemetry is on by default in some entry points; a privacy product does not phone home
# (set before any flwr import: Flower reads it when its telemetry module loads).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
