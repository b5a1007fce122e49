"""See fastpull work on a fresh Debian machine: ``make demo`` (``python -m scripts.demo``).

Starts a real registry (Debian's ``docker-registry``) on loopback, pushes a small
multi-platform image ``demo/hello:1.0`` (linux/amd64 and linux/arm64) to it, then runs the
real ``fastpull`` command so you see exactly what it prints: a pull, a second pull that finds
everything present, ``fastpull images``, and, when skopeo and umoci are installed, proof that
they read the store. The store is a temporary directory unless ``FASTPULL_STORE`` is set.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fastpull.types import Platform
from tests.support.images import Index, make_image, make_index, make_layer
from tests.support.registry import RegistryServer, RegistryStartError

REPOSITORY = "demo/hello"
TAG = "1.0"
SAMPLE_ARCHITECTURES = ("amd64", "arm64")
INSTALL_HINT = (
    "docker-registry is not installed: run `sudo apt-get install docker-registry` "
    "(or `bash scripts/install-deps.sh` for everything the tests use)"
)
# A proxy from the user's shell must not sit between fastpull and a loopback registry.
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


class StepFailed(Exception):
    """A command of the demo exited non-zero; carries its exit status."""

    def __init__(self, command: str, status: int) -> None:
        super().__init__(f"`{command}` failed with exit status {status}")
        self.status = status


def heading(text: str) -> None:
    """Start a section of the output."""
    print(f"\n==> {text}", flush=True)


def run(command: Sequence[str], env: dict[str, str], *, shown: str | None = None) -> None:
    """Run a command with its output going straight to the terminal."""
    shown = shown or shlex.join(command)
    print(f"$ {shown}", flush=True)
    status = subprocess.run(command, env=env, check=False).returncode
    if status != 0:
        raise StepFailed(shown, status)


def capture(command: Sequence[str], env: dict[str, str]) -> str:
    """Run a command and return its standard output (its errors still reach the terminal)."""
    print(f"$ {shlex.join(command)}", flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise StepFailed(shlex.join(command), done.returncode)
    return done.stdout


def build_sample() -> Index:
    """``demo/hello:1.0``: a shared base layer plus one layer per platform with /hello.txt."""
    base = make_layer(
        {"etc/os-release": b'NAME="fastpull demo"\nID=fastpull-demo\n', "bin/": b""}, seed=1
    )
    images = []
    for seed, architecture in enumerate(SAMPLE_ARCHITECTURES, start=2):
        greeting = f"Hello from fastpull! This is the linux/{architecture} image.\n"
        app = make_layer({"hello.txt": greeting.encode()}, seed=seed)
        images.append(make_image([base, app], architecture=architecture))
    return make_index(images)


def fastpull(*args: str, env: dict[str, str]) -> None:
    """Run this checkout's fastpull, shown as the ``fastpull`` command a user would type."""
    run([sys.executable, "-m", "fastpull", *args], env, shown=shlex.join(["fastpull", *args]))


def demo(store: Path, env: dict[str, str]) -> None:
    """Every step, with the registry running only for as long as they take."""
    heading("Starting a registry on loopback (docker-registry, plain HTTP)")
    with RegistryServer() as registry:
        print(f"registry listening at {registry.url}")

        platforms = " + ".join(f"linux/{a}" for a in SAMPLE_ARCHITECTURES)
        heading(f"Pushing {REPOSITORY}:{TAG} ({platforms})")
        digest = registry.pusher.push_index(REPOSITORY, TAG, build_sample())
        print(f"pushed {registry.host}/{REPOSITORY}:{TAG}  index digest {digest}")

        reference = f"{registry.host}/{REPOSITORY}:{TAG}"
        platform_option: list[str] = []
        if Platform.host().architecture not in SAMPLE_ARCHITECTURES:
            # The sample has no image for this machine; show the amd64 one instead.
            platform_option = ["--platform", "linux/amd64"]

        heading("Pulling it with fastpull")
        fastpull("pull", *platform_option, reference, env=env)

        heading("Pulling again: every layer is already in the store")
        fastpull("pull", *platform_option, reference, env=env)

        heading("Listing the store")
        fastpull("images", env=env)

        show_with_skopeo(store, reference, env)
        unpack_with_umoci(store, reference, env)

        heading("Stopping the registry")


def show_with_skopeo(store: Path, reference: str, env: dict[str, str]) -> None:
    """What skopeo, reading the OCI layout on its own, says about the pulled image."""
    if shutil.which("skopeo") is None:
        heading("skopeo is not installed: skipping `skopeo inspect`")
        return
    heading("skopeo reads the store (OCI image layout)")
    info = json.loads(capture(["skopeo", "inspect", f"oci:{store}:{reference}"], env))
    print(f"  Manifest:     {info['Digest']}")
    print(f"  Platform:     {info['Os']}/{info['Architecture']}")
    print(f"  Created:      {info['Created']}")
    print(f"  Layers:       {len(info['Layers'])}")
    for layer in info["Layers"]:
        print(f"    {layer}")


def unpack_with_umoci(store: Path, reference: str, env: dict[str, str]) -> None:
    """Unpack the pulled image with umoci and show the file the sample put in it."""
    if shutil.which("umoci") is None:
        heading("umoci is not installed: skipping `umoci unpack`")
        return
    heading("umoci unpacks the image it finds in the store")
    with tempfile.TemporaryDirectory(prefix="fastpull-demo-bundle-") as scratch:
        bundle = Path(scratch) / "bundle"
        run(["umoci", "unpack", "--rootless", "--image", f"{store}:{reference}", str(bundle)], env)
        hello = bundle / "rootfs" / "hello.txt"
        print(f"$ cat {hello}", flush=True)
        print(hello.read_text(), end="", flush=True)


def main() -> int:
    """Run the demo; the exit status is that of the first step that failed."""
    if shutil.which("docker-registry") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="fastpull-demo-") as scratch:
        # An empty docker config: the demo registry needs no login, and a credential helper
        # configured for the user must not be asked about it.
        docker_config = Path(scratch) / "docker-config"
        docker_config.mkdir()
        env["DOCKER_CONFIG"] = str(docker_config)
        if os.environ.get("FASTPULL_STORE"):
            store = Path(os.environ["FASTPULL_STORE"]).resolve()
            print(f"store: {store} (from FASTPULL_STORE; kept afterwards)")
        else:
            store = Path(scratch) / "store"
            print(f"store: {store} (temporary; set FASTPULL_STORE=DIR to keep it)")
        env["FASTPULL_STORE"] = str(store)
        try:
            demo(store, env)
        except RegistryStartError as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            return 1
        except StepFailed as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            return exc.status if 0 < exc.status < 256 else 1
        except KeyboardInterrupt:
            print("\ndemo interrupted; registry stopped", file=sys.stderr)
            return 130
    heading("Done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
