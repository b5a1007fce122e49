"""One batch spread over a Dask cluster (``pull -f FILE --cluster ADDRESS``, ``copy -f FILE
--to REGISTRY --cluster ADDRESS``).

The client plans as a local batch does and hands the missing blobs to Dask as tasks
(``plan``: balanced by bytes, largest first). For a pull, each task runs fastpull's own
engine on the worker that takes it, into a store every worker mounts at the same path
(``tasks``); the client (``client``) checks that every node runs the same fastpull, forwards
progress, cancels on Ctrl-C, and writes manifests and ``index.json`` once every blob of an
image is in place. For a copy into registries (``copying``), each task fetches into a
scratch store of its worker's own and uploads to the destinations (``relay``), and the
client pushes the manifests. Dask places, retries and moves tasks; fastpull never schedules
across machines itself. ``dask`` and ``distributed`` are an optional extra
(``fastpull[cluster]``).
"""
