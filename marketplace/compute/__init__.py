"""The compute site: what runs where the weights (or the sealed inputs) are opened.

For: everything that touches a decrypted model or an opened job input, in one place, importable
by the services (API process), the Celery worker and the provider's agent alike:

- :mod:`~marketplace.compute.store`: open the blob store, the KEK provider and the job sealing
  key from a picklable :class:`~marketplace.compute.store.StoreSpec` (the one way to do it);
- :mod:`~marketplace.compute.payload`: the sealed job input / result framing (HPKE);
- :mod:`~marketplace.compute.jobs`: ``predict``, ``evaluate`` and ``custom`` computations;
- :mod:`~marketplace.compute.sandbox` and :mod:`~marketplace.compute.jail` (with
  ``jail_build``, ``jail_cgroup``, ``sandbox_child``, ``sandbox_jailed``): consumer code in
  bubblewrap and per-job cgroups;
- :mod:`~marketplace.compute.he`: HE evaluation and the local process pool;
- :mod:`~marketplace.compute.hosted`: one marketplace-hosted job from spec to sealed result;
- :mod:`~marketplace.compute.executor`: the one :class:`~marketplace.compute.executor.Executor`
  interface (local, or :mod:`~marketplace.compute.remote` over Celery, with the signed task
  messages of :mod:`~marketplace.compute.messages`), chosen once from settings.

Who holds which key here::

    key                        held by                         opens
    KEK (kek.json / SOM_KEK)   API replica, worker             model data keys (wrapped, AAD-bound)
    job sealing key            API replica (makes it), worker  sealed inputs of marketplace-hosted jobs
    task key (task_mac.key)    API replica (makes it), worker  nothing: authenticates task messages
    agent sealing key          the provider's agent            sealed inputs of provider-hosted jobs
    consumer reply key         the consumer (SDK)              sealed results
    HE secret key              the consumer (SDK)              HE results; never reaches a compute site

Not for: authorization, metering, audit, leases or job state (:mod:`marketplace.services`), HTTP
(:mod:`marketplace.api`). This package imports neither, except the leaf blob store
(``marketplace/services/blobstore.py``, which imports only :mod:`marketplace.errors`).
"""

__all__: list[str] = []
