#!/bin/bash
# Installs what `make bench` needs: rsyslog (+gnutls, relp) and zstd from Debian,
# and syslog-ng unpacked into bench/.cache/syslog-ng. syslog-ng-core conflicts
# with rsyslog as a Debian package, so its .deb (and the libraries it needs that
# are not installed) are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x`; the bench runs it with LD_LIBRARY_PATH and its own module path.
set -euo pipefail
cd "$(dirname "$0")"
need=()
for p in rsyslog rsyslog-gnutls rsyslog-relp zstd; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
root=.cache/syslog-ng
if [[ ! -x $root/usr/sbin/syslog-ng ]]; then
    mkdir -p .cache/debs && cd .cache/debs
    pkgs=(syslog-ng-core)
    # Runtime libraries of syslog-ng-core not installed alongside rsyslog.
    for lib in libivykis0 libnet1 libpcre3 libwrap0 libjson-c5 libglib2.0-0; do
        dpkg -s "$lib" >/dev/null 2>&1 || pkgs+=("$lib")
    done
    apt-get download "${pkgs[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
    cd ../..
    rm -rf "$root.tmp" && mkdir -p "$root.tmp"
    for deb in .cache/debs/*.deb; do dpkg-deb -x "$deb" "$root.tmp"; done
    rm -rf "$root" && mv "$root.tmp" "$root"
fi
r=$PWD/$root
LD_LIBRARY_PATH=$r/usr/lib/x86_64-linux-gnu:$r/lib/x86_64-linux-gnu:$r/usr/lib/syslog-ng \
    "$r/usr/sbin/syslog-ng" --version | head -1
