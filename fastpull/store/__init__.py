"""Where bytes rest: the local OCI image layout.

``layout`` owns the directory (setup, blobs, ``index.json``); ``ingest`` downloads one blob
into it; ``locks`` takes every flock the same way; ``files`` holds durable writes and the
OSError-to-StoreError mapping; ``journal`` records which ranges of a partial download are on
disk; ``diskqueue`` moves syncs and page-cache releases off the download loop; ``gc`` lists
and deletes blobs and downloads; ``inventory`` works out which blobs images need (pure);
``maintenance`` decides what rmi and gc remove and reports usage.
"""
