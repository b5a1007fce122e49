"""How bytes move: blobs split into Range chunks, fetched by worker processes that drive
libcurl multi handles, hashed as they land.

``scheduler`` plans chunks (pure); ``worker`` runs the transfers and ``pool`` starts the
workers; ``routing`` decides what an HTTP answer means for a blob, ``resume`` what goes into
the resume journal, ``verify`` and ``commit`` hash the written prefix and publish the blob;
``records`` holds the run's state, ``job`` is the loop that ties them together, and
``download`` is the API the rest of fastpull calls.
"""
