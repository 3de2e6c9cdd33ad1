"""The provider agent (``som agent``) and the job payload formats it shares with the SDK.

For: running beside a provider's weights, pulling work for its offerings over outbound HTTP,
computing, posting sealed results (:mod:`marketplace.agent.runner`); the sealed job envelope
(:mod:`marketplace.compute.payload`) and the job computations (:mod:`marketplace.compute.jobs`),
also used by the marketplace's own worker for marketplace-hosted offerings.
Not for: anything touching the marketplace's DB (the agent only speaks HTTP).
"""
