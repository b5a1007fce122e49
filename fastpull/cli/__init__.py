"""The command line: click commands (``commands``), docker-style progress output
(``progress``) and the ``images`` table (``listing``)."""
