#!/usr/bin/env bash
# System packages fastpull's build, tests, demo and benchmarks use (Debian / Ubuntu).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

packages=(
  docker-registry   # the real registry the tests and the demo run on loopback
  skopeo umoci      # interop: they must read what fastpull stores
  podman containerd # interop: they must load what fastpull save writes
  apache2-utils     # htpasswd (bcrypt) for the basic-auth registry
  libssl-dev gcc    # the native extension links OpenSSL's libcrypto
  libxxhash-dev     # ... and libxxhash (the download workers' journal checksum)
  curl openssl      # benchmarks: the floor row hashes with openssl dgst
  nginx-light aria2 # benchmarks only: the per-connection-capped proxy, a segmented downloader
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
