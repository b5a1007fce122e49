"""A throwaway ``DOCKER_CONFIG`` directory with helpers to write ``config.json``."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class DockerConfig:
    """An empty Docker config directory plus the fastpull store path chosen for the same test."""

    def __init__(self, path: Path, store: Path) -> None:
        self.path = path
        self.store = store

    @property
    def config_file(self) -> Path:
        """``<path>/config.json`` (it does not exist until something is written)."""
        return self.path / "config.json"

    def read(self) -> dict[str, Any]:
        """The current ``config.json`` document, or ``{}``."""
        if not self.config_file.exists():
            return {}
        return json.loads(self.config_file.read_text())

    def write(self, document: Mapping[str, Any]) -> None:
        """Replace ``config.json`` with ``document``."""
        self.config_file.write_text(json.dumps(document, indent=2))

    def add_auth(
        self,
        registry: str,
        *,
        username: str | None = None,
        password: str | None = None,
        identity_token: str | None = None,
        registry_token: str | None = None,
    ) -> None:
        """Add or replace ``auths[registry]`` the way ``docker login`` stores it."""
        entry: dict[str, str] = {}
        if username is not None:
            entry["auth"] = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        if identity_token is not None:
            entry["identitytoken"] = identity_token
        if registry_token is not None:
            entry["registrytoken"] = registry_token
        document = self.read()
        document.setdefault("auths", {})[registry] = entry
        self.write(document)
