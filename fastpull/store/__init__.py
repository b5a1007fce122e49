"""Where bytes rest: the local OCI image layout.

``layout`` owns the directory (blobs, ingests, ``index.json``, locks); ``journal`` records
which ranges of a partial download are on disk; ``diskqueue`` moves syncs and page-cache
releases off the download loop; ``inventory`` works out which blobs images need (pure);
``maintenance`` removes images and garbage and reports usage.
"""
