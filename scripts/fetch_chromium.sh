#!/usr/bin/env bash
# Fetch Debian's headless-capable Chromium without root and print the path of a launcher.
#
#   scripts/fetch_chromium.sh [CACHE_DIR]   # default: ${SEGSR_JAX_CACHE_DIR:-~/.cache/segsr_jax}/chromium
#
# For tests/test_report_browser.py on a fresh Debian machine that can reach the Debian package
# registry: no root, nothing installed system-wide. apt itself runs with a private package list
# (apt-get update into CACHE_DIR/apt), apt's own solver picks the packages `apt-get install
# chromium` would add to this machine (apt-get -s: a simulation, needs no root), `apt-get
# download` fetches them and `dpkg-deb -x` unpacks them under CACHE_DIR/root. The launcher
# CACHE_DIR/chromium points LD_LIBRARY_PATH at the unpacked libraries. A second call only
# checks the launcher (cached). Exit status: 0 and the launcher's path on stdout; 3 when the
# registry could not be reached or a download failed; 1 for anything else (not Debian, no apt).
set -euo pipefail

cache="${1:-${SEGSR_JAX_CACHE_DIR:-$HOME/.cache/segsr_jax}/chromium}"
launcher="$cache/chromium"

if [ -x "$launcher" ] && "$launcher" --version >/dev/null 2>&1; then
    echo "$launcher"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "fetch_chromium: no $tool (not a Debian system)" >&2; exit 1; }
done

mkdir -p "$cache"
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/debs" "$work/root"
apt_opts=(-q -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
          -o Debug::NoLocking=1)

if ! apt-get "${apt_opts[@]}" update >"$work/update.log" 2>&1 \
        || grep -q '^\(W\|E\): Failed to fetch' "$work/update.log"; then
    echo "fetch_chromium: apt-get update failed (is the Debian registry reachable?):" >&2
    tail -n 3 "$work/update.log" >&2
    exit 3
fi
# The packages apt would install here (those already installed are not fetched again).
packages=$(apt-get "${apt_opts[@]}" -s --no-install-recommends install chromium \
           | awk '/^Inst /{print $2}')
if [ -z "$packages" ]; then
    echo "fetch_chromium: apt resolved no packages for chromium" >&2
    exit 1
fi
# shellcheck disable=SC2086  # one word per package
if ! (cd "$work/debs" && apt-get "${apt_opts[@]}" download $packages) >"$work/download.log" 2>&1; then
    echo "fetch_chromium: apt-get download failed:" >&2
    tail -n 3 "$work/download.log" >&2
    exit 3
fi
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done

libs=""
for dir in "$work"/root/usr/lib/*-linux-gnu "$work"/root/usr/lib/*-linux-gnu/pulseaudio; do
    [ -d "$dir" ] && libs="$libs:${dir/#$work/$cache}"
done
cat >"$work/chromium" <<EOF
#!/bin/sh
# Debian's chromium unpacked by scripts/fetch_chromium.sh (its libraries beside it).
export LD_LIBRARY_PATH="${libs#:}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$cache/root/usr/lib/chromium/chromium" "\$@"
EOF
chmod +x "$work/chromium"

# Replace the cache in one step: a killed fetch leaves only its own temporary folder.
rm -rf "$cache/root" "$launcher"
mv "$work/root" "$cache/root"
mv "$work/chromium" "$launcher"
if ! "$launcher" --version >&2; then
    echo "fetch_chromium: the unpacked chromium does not start" >&2
    exit 1
fi
echo "$launcher"
