"""One storage layer for every location lorafleet reads or writes.

A location is text in one of these forms, parsed by :func:`parse_location` into a
:class:`Location`:

- a local path (``runs/x``, ``/data/x``) or ``file:///data/x``;
- ``s3://BUCKET/KEY``: AWS S3 or any S3-compatible store (MinIO, on-prem);
- ``gs://BUCKET/KEY``: Google Cloud Storage;
- ``pvc://CLAIM/PATH``: a PersistentVolumeClaim, read and written where the current step
  mounts it (``LORAFLEET_PVC_MOUNTS=claim1=/mnt/a,claim2=/mnt/b``, set by the compiled
  pipeline); a claim not listed there is looked for at ``$LORAFLEET_PVC_ROOT/CLAIM``
  (default ``/mnt/pvc/CLAIM``) when that directory exists.

:class:`Storage` runs every operation on a location: s3:// and gs:// through fsspec
(s3fs, gcsfs), file:// and pvc:// through the OS. Credentials come from each cloud's
standard chain (botocore: environment, shared config, IRSA web identity, instance or
container role; google-auth: application default credentials, Workload Identity); this
module never reads a key itself. Every failure a user can cause or fix is one
:class:`~lorafleet.errors.StorageError` line, ``URI: reason``.

Modules: :mod:`~lorafleet.storage.location` (parsing and containment),
:mod:`~lorafleet.storage.retry` (transient errors, backoff, one-line explanations),
:mod:`~lorafleet.storage.driver` (the primitive operations),
:mod:`~lorafleet.storage.local` (local files and the ``file``/``pvc`` driver),
:mod:`~lorafleet.storage.remote` (the s3 and gs drivers), :mod:`~lorafleet.storage.store`
(the :class:`Storage` facade).
"""

from __future__ import annotations

from lorafleet.storage.driver import PreconditionFailed, Versioned
from lorafleet.storage.location import (
    DEFAULT_PVC_ROOT,
    PVC_MOUNTS_ENV,
    PVC_ROOT_ENV,
    SCHEMES,
    Location,
    LocationLike,
    parse_location,
    parse_pvc_mounts,
)
from lorafleet.storage.retry import RetryPolicy, is_transient
from lorafleet.storage.store import Storage

__all__ = [
    "DEFAULT_PVC_ROOT",
    "PVC_MOUNTS_ENV",
    "PVC_ROOT_ENV",
    "SCHEMES",
    "Location",
    "LocationLike",
    "PreconditionFailed",
    "RetryPolicy",
    "Storage",
    "Versioned",
    "is_transient",
    "parse_location",
    "parse_pvc_mounts",
]
