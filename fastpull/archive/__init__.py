"""Image archives: ``fastpull save`` writes the store's images as one tar, ``load`` reads one."""
