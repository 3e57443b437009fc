#!/bin/bash
# Build syslog-relay_VERSION_all.deb from a copy of the checkout and lint it.
#
#   packaging/build-deb.sh [OUTDIR]        (default: dist/ in the checkout)
#   NO_LINTIAN=1 packaging/build-deb.sh    (skip lintian)
#
# The build runs in a temporary copy of the files git knows (tracked plus new,
# not ignored): no venv, cache or build output of the checkout gets in, and
# nothing is written to the checkout except OUTDIR/*.deb. PATH is reset so
# that pyenv or a venv cannot shadow Debian's /usr/bin/python3.
# Build dependencies: see Build-Depends in packaging/debian/control, plus lintian.
set -euo pipefail

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV PYENV_VERSION CONDA_PREFIX
export LC_ALL=C.UTF-8

top=$(cd "$(dirname "$0")/.." && pwd)
outdir=${1:-$top/dist}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/relay/__init__.py")
deb_version=$(dpkg-parsechangelog -l "$top/packaging/debian/changelog" -S Version)
if [ -z "$version" ] || [ "$version" != "$deb_version" ]; then
	echo "build-deb: relay.__version__ ($version) differs from packaging/debian/changelog" \
		"($deb_version): add a changelog entry (dch -v $version)" >&2
	exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/syslog-relay-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/syslog-relay-$version
mkdir "$src"

if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	# --ignore-failed-read: a tracked file deleted in the working tree is skipped.
	git -C "$top" ls-files -z --cached --others --exclude-standard |
		tar -C "$top" --null --files-from=- --ignore-failed-read -cf - 2>/dev/null |
		tar -C "$src" -xf -
else
	tar -C "$top" --exclude='./.venv*' --exclude=./.git --exclude=./dist --exclude=./build \
		--exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
fi
cp -a "$src/packaging/debian" "$src/debian"

echo "build-deb: building syslog-relay $version in $src"
(cd "$src" && dpkg-buildpackage --build=binary --no-sign) >"$work/build.log" 2>&1 || {
	tail -n 60 "$work/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed (log above)" >&2
	exit 1
}

deb=syslog-relay_${version}_all.deb
cp "$work/$deb" "$outdir/$deb"
echo "build-deb: built $outdir/$deb"

if [ -z "${NO_LINTIAN:-}" ]; then
	# --fail-on warning: a warning fails the build like an error.
	lintian --fail-on error,warning --tag-display-limit 0 "$outdir/$deb"
	echo "build-deb: lintian clean"
fi
