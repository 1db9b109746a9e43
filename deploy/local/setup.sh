#!/usr/bin/env bash
# Set up everything the local stack and the tests need, on a fresh machine or an
# old one: Debian packages, the pinned Node tools, the Python environment and the
# control-plane binaries and images (built with Go and buildah, cached by content in
# the user's cache folder, which every clone on the machine shares). Idempotent
# and quiet when there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"

step() { printf '\n==> %s\n' "$*" >&2; }
started=$SECONDS

# The real node: containerd, runc, CNI plugins, iptables and conntrack (kube-proxy), iproute2 and util-linux (netns).
debian_packages=(buildah docker-registry wrk mmdebstrap containerd runc containernetworking-plugins iptables conntrack iproute2 util-linux prometheus)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  step "installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

for tool in go node npm python3; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required but not on PATH" >&2; exit 1; }
done

if [[ ! -x node_modules/.bin/azurite-blob ]] || [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
  step "installing pinned Node tools (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi

if [[ ! -x .venv/bin/python ]]; then
  step "creating the Python environment (.venv)"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.modelapp-installed
if [[ ! -f $stamp ]] || [[ pyproject.toml -nt $stamp ]]; then
  step "installing ModelApp and its development dependencies into .venv"
  # --no-compile: Python compiles what it imports on first use, not every file of every package now.
  .venv/bin/python -m pip install -q --no-compile -e '.[dev]'
  touch "$stamp"
fi

# The same folder as modelapp_localstack.binaries.cache_root().
cache_dir=${MODELAPP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/modelapp}
if [[ -d .cache && $(realpath -m "$cache_dir") != "$PWD/.cache" ]]; then
  # Built by an older setup inside the clone: move what the shared cache lacks there instead of building it again.
  step "moving the clone's .cache/ into $cache_dir"
  mkdir -p "$cache_dir/images"
  for entry in .cache/* .cache/images/*; do
    [[ -e $entry && $entry != .cache/images ]] || continue
    target="$cache_dir/${entry#.cache/}"
    [[ -e $target || $entry == *.partial || $entry == */work-* || $entry == */.lock ]] || mv "$entry" "$target"
  done
  rm -rf .cache
fi

step "control-plane binaries and images (cached by content in $cache_dir)"
.venv/bin/modelapp-stack build
printf '\nsetup: ready in %ss\n' "$((SECONDS - started))" >&2
