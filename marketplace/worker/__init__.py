"""Scale-out compute: the Celery worker that runs marketplace-hosted computations.

For: ``SOM_JOB_BACKEND=celery``. API replicas send HE evaluations and marketplace-hosted jobs to
Celery workers over Redis (:class:`marketplace.compute.remote.CeleryExecutor`); ``som worker``
runs a worker (:mod:`marketplace.worker.celery_app`) whose tasks (:mod:`marketplace.worker.tasks`)
call the same compute-site code as the local executor (:mod:`marketplace.compute`). Workers
share the data directory (blob store) and the key directory (KEK file, job sealing key, task
key) with the API replicas and never need the database or the API process.

Not for: authorization, metering, audit or job state: the API replicas keep all of those in the
database and use workers for computation only. Nothing outside the CLI imports this package.
"""

__all__: list[str] = []
