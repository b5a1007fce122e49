"""Who to talk to, and how: the registry side of a pull.

``responses`` is the one policy for answers (redirect, log in, retry, fail) and backoff
(pure); ``transport`` sends requests (TLS policy, retries, redirects); ``auth`` decides on
challenges and tokens without doing I/O; ``credentials`` reads docker's config and helpers;
``settings`` holds per-registry policy; ``manifest`` parses what registries serve (pure);
``client`` speaks the distribution API on top of all of them.
"""
