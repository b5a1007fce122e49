"""How bytes move: blobs split into Range chunks, fetched by worker processes that drive
libcurl multi handles, hashed as they land.

``scheduler`` plans chunks (pure); ``worker`` runs the transfers; ``verify`` advances the
SHA-256 over the written prefix; ``download`` is the loop that ties them together.
"""
