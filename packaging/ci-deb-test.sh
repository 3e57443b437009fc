#!/bin/bash
# CI smoke test of the Debian package, as root on Debian 12 without systemd as PID 1:
# build and lint the .deb, install it with apt, verify the units, the man pages
# and the docs, check the packaged configuration, run the unit's ExecStart as
# the service user, send messages with logger, find them in staging, check and
# reload (ExecReload) it while it runs, stop, reinstall (upgrade path), purge
# (which keeps the unarchived staging), install again, purge with
# SYSLOG_RELAY_PURGE_DATA=yes and check that nothing is left.
#
#   packaging/ci-deb-test.sh [OUTDIR]     (default: dist/ in the checkout)
#
# Idempotent: a previous installation is purged first. Every wait is bounded.
# Prints PASS/FAIL lines; exits non-zero at the first failure.
set -euo pipefail

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYENV_VERSION
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

top=$(cd "$(dirname "$0")/.." && pwd)
outdir=${1:-$top/dist}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)  # apt-get needs a path, not a bare name: make it absolute
config=/etc/syslog-relay/syslog-relay.toml
state=/var/lib/syslog-relay
unit_dir=/lib/systemd/system
user=syslog-relay
port=514

work=$(mktemp -d /tmp/syslog-relay-ci-deb.XXXXXX)
relay_pid=
notify_pid=

cleanup() {
	# Only the processes this script started, by pid.
	for pid in $relay_pid $notify_pid; do
		kill "$pid" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT

pass() { echo "PASS: $*"; }
fail() {
	echo "FAIL: $*"
	for f in "$work"/*.log; do
		if [ -s "$f" ]; then
			echo "--- $f (last 40 lines)"
			tail -n 40 "$f"
		fi
	done
	exit 1
}
step() { echo "--- $*"; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
	local limit=$1 what=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@"; do
		[ $SECONDS -lt $deadline ] || fail "$what (not within ${limit}s)"
		sleep 0.2
	done
}

[ "$(id -u)" = 0 ] || fail "must run as root (installs and purges the package)"

step "tools and build dependencies"
need=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
	lintian systemd util-linux bsdutils procps)
missing=()
for p in "${need[@]}"; do
	dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
		missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	timeout 600 apt-get update -q >/dev/null
	timeout 900 apt-get install -y -q --no-install-recommends "${missing[@]}" >"$work/apt-deps.log" 2>&1 ||
		fail "apt-get install ${missing[*]}"
fi
pass "build dependencies installed"

if dpkg-query -W -f '${Status}' syslog-relay 2>/dev/null | grep -q 'installed\|config-files'; then
	step "purging a previous installation"
	SYSLOG_RELAY_PURGE_DATA=yes timeout 300 apt-get purge -y -q syslog-relay \
		>"$work/apt-prepurge.log" 2>&1 ||
		fail "purge of a previous installation"
fi

step "build"
timeout 900 "$top/packaging/build-deb.sh" "$outdir" >"$work/build.log" 2>&1 ||
	fail "packaging/build-deb.sh (build and lintian)"
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/relay/__init__.py")
deb=$outdir/syslog-relay_${version}_all.deb
[ -f "$deb" ] || fail "no $deb"
pass "built $(basename "$deb"), lintian reports no errors or warnings"

step "install"
timeout 600 apt-get install -y -q "$deb" >"$work/apt-install.log" 2>&1 || fail "apt-get install $deb"
pass "apt-get install ./$(basename "$deb")"

step "installed files"
[ -x /usr/bin/syslog-relay ] && [ -x /usr/bin/syslog-archive ] || fail "/usr/bin entry points"
for mod in relay archive; do
	[ -f /usr/share/syslog-relay/$mod/__init__.py ] || fail "$mod not in /usr/share/syslog-relay"
	compgen -G "/usr/share/syslog-relay/$mod/__pycache__/__init__.cpython-3*.pyc" >/dev/null ||
		fail "$mod not byte-compiled"
	compgen -G "/usr/lib/python3*/dist-packages/$mod" >/dev/null &&
		fail "$mod installed in dist-packages"
	# Not importable from the system python3: private means private.
	(cd / && python3 -I -c "import $mod" 2>/dev/null) && fail "$mod importable system-wide"
done
pass "relay and archive are private modules in /usr/share/syslog-relay, byte-compiled"
got=$(syslog-relay --version) && [ "$got" = "syslog-relay $version" ] ||
	fail "syslog-relay --version printed '$got'"
got=$(syslog-archive --version) && [ "$got" = "syslog-archive $version" ] ||
	fail "syslog-archive --version printed '$got'"
pass "--version is $version"
getent passwd $user >/dev/null || fail "no user $user"
[ "$(stat -c '%U:%G %a' $state)" = "$user:$user 750" ] || fail "$state: $(stat -c '%U:%G %a' $state)"
[ "$(stat -c '%U:%G %a' /etc/syslog-relay)" = "root:$user 750" ] || fail "/etc/syslog-relay mode"
[ "$(stat -c '%U:%G %a' /etc/default/syslog-archive)" = "root:$user 640" ] ||
	fail "/etc/default/syslog-archive mode"
grep -qx "$config" /var/lib/dpkg/info/syslog-relay.conffiles || fail "$config is not a conffile"
pass "user $user, state directory, configuration modes, conffile"
for page in syslog-relay syslog-archive; do
	[ -f /usr/share/man/man8/$page.8.gz ] || fail "man page $page(8)"
done
[ -f /usr/share/man/man5/syslog-relay.toml.5.gz ] || fail "man page syslog-relay.toml(5)"
pass "man pages"
doc=/usr/share/doc/syslog-relay
for f in README.md forwarding.md spool-format.md staging-and-archive-format.md benchmarks.md; do
	compgen -G "$doc/$f*" >/dev/null || fail "$doc/$f not installed"
done
for f in syslog-relay.toml edge.toml core.toml tls-relay.toml archive-minio.toml \
	60-syslog-relay-tls.conf; do
	compgen -G "$doc/examples/$f*" >/dev/null || fail "$doc/examples/$f not installed"
done
pass "the docs the README links to and the example files are in $doc"

step "systemd units"
for unit in syslog-relay syslog-archive; do
	[ -f $unit_dir/$unit.service ] || fail "$unit_dir/$unit.service missing"
	timeout 60 systemd-analyze verify $unit_dir/$unit.service >"$work/verify-$unit.out" \
		2>"$work/verify-$unit.log" || fail "systemd-analyze verify $unit.service"
	[ ! -s "$work/verify-$unit.log" ] || fail "systemd-analyze verify $unit.service wrote to stderr"
	grep -qx 'Type=notify' $unit_dir/$unit.service || fail "$unit.service is not Type=notify"
done
for unit in syslog-archive-verify.service syslog-archive-verify.timer; do
	[ -f $unit_dir/$unit ] || fail "$unit_dir/$unit missing"
	timeout 60 systemd-analyze verify $unit_dir/$unit >"$work/verify-$unit.out" \
		2>"$work/verify-$unit.log" || fail "systemd-analyze verify $unit"
	[ ! -s "$work/verify-$unit.log" ] || fail "systemd-analyze verify $unit wrote to stderr"
done
[ ! -e /etc/systemd/system/timers.target.wants/syslog-archive-verify.timer ] ||
	fail "syslog-archive-verify.timer enabled by default"
grep -q 'ExecStart=/usr/bin/syslog-archive verify ' $unit_dir/syslog-archive-verify.service ||
	fail "syslog-archive-verify.service does not run syslog-archive verify"
[ -L /etc/systemd/system/multi-user.target.wants/syslog-relay.service ] ||
	fail "syslog-relay.service not enabled"
[ ! -e /etc/systemd/system/multi-user.target.wants/syslog-archive.service ] ||
	fail "syslog-archive.service enabled without a bucket"
pass "systemd-analyze verify: both units clean; relay enabled, archiver disabled"

# As the unit runs it: the service user, CAP_NET_BIND_SERVICE only, no new
# privileges, a clean environment.
as_service() {
	env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}
setpriv_service=(setpriv --reuid=$user --regid=$user --init-groups --no-new-privs
	--inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service
	--bounding-set=-all,+net_bind_service)

step "configuration checks with the packaged defaults"
as_service timeout 60 "${setpriv_service[@]}" /usr/bin/syslog-relay check --config $config \
	>"$work/relay-check.log" 2>&1 || fail "syslog-relay check (as $user)"
pass "syslog-relay check: $(head -n 1 "$work/relay-check.log")"
rc=0
as_service timeout 60 "${setpriv_service[@]}" /usr/bin/syslog-archive check --config $config \
	>"$work/archive-check.log" 2>&1 || rc=$?
# The default has the archive disabled: check must say so, either as success
# ("disabled") or as a configuration error naming the archive settings.
if [ $rc = 0 ] && grep -qi 'disabled' "$work/archive-check.log"; then
	pass "syslog-archive check: archive disabled, exit 0"
elif [ $rc = 2 ] && grep -q 'archive\.' "$work/archive-check.log"; then
	pass "syslog-archive check: exit 2, $(head -n 1 "$work/archive-check.log")"
else
	fail "syslog-archive check with the archive disabled: exit $rc"
fi

step "run the relay as the unit does"
exec_start=$(sed -n 's/^ExecStart=//p' $unit_dir/syslog-relay.service)
[ -n "$exec_start" ] || fail "no ExecStart in syslog-relay.service"
read -r -a exec_argv <<<"$exec_start"
if timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
	fail "port $port is already in use on this machine"
fi
# A stand-in for systemd's notify socket (abstract: no file permissions).
notify_socket="@syslog-relay-ci-$$-$RANDOM"
python3 -I -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + sys.argv[1][1:])
s.settimeout(120)
print("bound", flush=True)
while True:
    msg = s.recv(4096).decode()
    print(msg.replace("\n", " "), flush=True)
    if "STOPPING=1" in msg:
        break
' "$notify_socket" >"$work/notify.log" 2>&1 &
notify_pid=$!
wait_for 10 "notify listener bound" grep -q '^bound' "$work/notify.log"

(cd / && umask 0027 && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
	NOTIFY_SOCKET="$notify_socket" "${setpriv_service[@]}" "${exec_argv[@]}") \
	>"$work/relay.log" 2>&1 &
relay_pid=$!
wait_for 30 "relay sends READY=1" grep -q 'READY=1' "$work/notify.log"
kill -0 $relay_pid 2>/dev/null || fail "relay exited"
[ "$(ps -o user= -p $relay_pid)" = "$user" ] || fail "relay runs as $(ps -o user= -p $relay_pid)"
pass "relay runs as $user on port $port and reported READY=1 ($exec_start)"

step "send messages with logger"
token="ci-deb-$$-$RANDOM"
n=5
for i in $(seq 1 $n); do
	framing=()
	[ $((i % 2)) = 0 ] && framing=(--octet-count)
	timeout 10 logger --tcp --server 127.0.0.1 --port $port --rfc5424 "${framing[@]}" \
		--tag ci-deb "message $i $token" || fail "logger $i"
done
count_staged() {
	local found
	found=$(grep -rhoa "message [0-9]* $token" $state/staging 2>/dev/null | sort -u | wc -l)
	[ "$found" -ge $n ]
}
wait_for 30 "$n messages in $state/staging" count_staged
pass "$n messages (LF and octet-counted) landed in $state/staging"
bad=$(find $state -not -user $user | head -n 1)
[ -z "$bad" ] || fail "$bad is not owned by $user"
pass "staging files owned by $user"

step "check and reload against the running relay (the unit's ExecReload lines)"
as_service timeout 60 "${setpriv_service[@]}" /usr/bin/syslog-relay check --config $config \
	>"$work/relay-check-live.log" 2>&1 || fail "syslog-relay check next to the running relay"
pass "syslog-relay check passes while the relay holds its addresses"
# systemd runs ExecReload= lines in order and fails the reload at the first failure.
exec_reload() {
	local line argv
	while read -r line; do
		line=${line//\$MAINPID/$relay_pid}
		read -r -a argv <<<"$line"
		as_service timeout 60 "${setpriv_service[@]}" "${argv[@]}" </dev/null || return 1
	done < <(sed -n 's/^ExecReload=//p' $unit_dir/syslog-relay.service)
}
exec_reload >"$work/reload.log" 2>&1 || fail "reload with the packaged configuration"
ready_twice() { [ "$(grep -c 'READY=1' "$work/notify.log")" -ge 2 ]; }
wait_for 30 "READY=1 after the reload" ready_twice
pass "reload (check, then SIGHUP) with the packaged configuration"
cp -p $config "$work/config.orig"
printf '\n[limits]\noversize = "explode"\n' >>$config
rc=0
exec_reload >"$work/reload-bad.log" 2>&1 || rc=$?
cp -p "$work/config.orig" $config
[ $rc != 0 ] && grep -q 'limits.oversize' "$work/reload-bad.log" ||
	fail "reload with a bad configuration: exit $rc, $(head -n 1 "$work/reload-bad.log")"
[ "$(grep -c 'RELOADING=1' "$work/notify.log")" = 1 ] || fail "the bad configuration was signalled"
kill -0 $relay_pid 2>/dev/null || fail "relay exited"
pass "reload with a bad configuration refused: $(head -n 1 "$work/reload-bad.log")"

step "stop the relay"
kill -TERM $relay_pid
deadline=$((SECONDS + 30))
while kill -0 $relay_pid 2>/dev/null; do
	[ $SECONDS -lt $deadline ] || fail "relay still running 30s after SIGTERM"
	sleep 0.2
done
rc=0
wait $relay_pid || rc=$?
relay_pid=
[ $rc = 0 ] || fail "relay exited with status $rc after SIGTERM"
wait_for 10 "relay sends STOPPING=1" grep -q 'STOPPING=1' "$work/notify.log"
wait $notify_pid || true
notify_pid=
count_staged || fail "messages missing from staging after the stop"
pass "SIGTERM: STOPPING=1, exit 0, messages kept"

step "upgrade path (reinstall) keeps the state"
marker=$state/ci-upgrade-marker
install -o $user -g $user -m 0640 /dev/null $marker
timeout 600 dpkg -i "$deb" >"$work/dpkg-reinstall.log" 2>&1 || fail "dpkg -i (reinstall)"
[ -f $marker ] && count_staged || fail "state lost on reinstall"
[ "$(stat -c '%U:%G %a' /etc/syslog-relay)" = "root:$user 750" ] ||
	fail "/etc/syslog-relay mode lost on reinstall"
pass "reinstall keeps $state and the modes"

step "purge without confirmation keeps unarchived logs"
timeout 300 apt-get purge -y -q syslog-relay >"$work/apt-purge-keep.log" 2>&1 ||
	fail "apt-get purge (unconfirmed)"
count_staged || fail "purge deleted unarchived staging without confirmation"
getent passwd $user >/dev/null || fail "user $user removed while it still owns $state"
[ ! -e /etc/syslog-relay ] || fail "/etc/syslog-relay left after purge"
grep -q 'were not archived or delivered' "$work/apt-purge-keep.log" ||
	fail "purge did not say why it kept $state"
pass "purge kept $state and its owner, removed the configuration, and said so"

step "purge with confirmation"
timeout 600 apt-get install -y -q "$deb" >"$work/apt-reinstall.log" 2>&1 ||
	fail "apt-get install over kept state"
count_staged || fail "kept staging lost on reinstall"
SYSLOG_RELAY_PURGE_DATA=yes timeout 300 apt-get purge -y -q syslog-relay \
	>"$work/apt-purge.log" 2>&1 || fail "apt-get purge (confirmed)"
# /var/cache/man holds man-db's formatted pages of anyone who ran man(1);
# man-db expires them itself.
left=$(find /etc /var /usr /lib /opt -xdev \( -name '*syslog-relay*' -o -name '*syslog-archive*' \) \
	-not -path "$top/*" -not -path "$outdir/*" -not -path '/var/cache/man/*' 2>/dev/null |
	head -n 20)
[ -z "$left" ] || fail "left after purge: $left"
getent passwd $user >/dev/null && fail "user $user left after purge"
getent group $user >/dev/null && fail "group $user left after purge"
dpkg-statoverride --list | grep -q syslog-relay && fail "dpkg-statoverride entries left"
dpkg-query -W -f '${Status}' syslog-relay 2>/dev/null | grep -q 'installed\|config-files' &&
	fail "dpkg still knows syslog-relay"
pass "purge removed files, configuration, state, user and group"

echo "PASS: Debian package test complete ($(basename "$deb"))"
