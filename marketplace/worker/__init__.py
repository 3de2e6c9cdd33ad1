"""Scale-out compute: a Celery app whose workers run marketplace-hosted computations.

For: ``SOM_JOB_BACKEND=celery``. API replicas send HE evaluations and marketplace-hosted jobs
to Celery workers over Redis (:mod:`marketplace.worker.dispatch`); ``som worker`` runs a worker
(:mod:`marketplace.worker.celery_app`) that executes them with the same code as the local pool
(:mod:`marketplace.worker.tasks`). Workers share the data directory (blob store, KEK file, job
sealing key) with the API replicas and never need the database or the API process.

Not for: authorization, metering, audit or job state: the API replicas keep all of those in the
database and use workers for computation only.
"""

__all__: list[str] = []
