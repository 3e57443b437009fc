"""What a fleet sends: the load generator's traffic profiles other than ``uniform``.

A relay aggregates many kinds of senders, and its fast path must be fast on
that mix, not on one form. Each message here comes from a *sender* (a host
with its apps, its zone, its clock error and the timestamp form of the
software that sends for it) and carries its own timestamp:

* rsyslog ``RSYSLOG_SyslogProtocol23Format``: microseconds and the numeric
  offset (``2026-12-07T01:02:03.123456+05:30``);
* syslog-ng: seconds and the offset (``2026-12-07T01:02:03+05:30``);
* applications: milliseconds and ``Z``, or whole seconds and ``Z``;
* network devices and ``logger``: RFC 3164 (``Dec  7 01:02:03 host tag[pid]:``),
  in the relay's zone (UTC), as most such devices are set.

Generation is deterministic per sequence number (the sender, severity, size
and text of message ``seq`` are picked by indexing pre-shuffled tables), so
batches can be generated in any order and in any process.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PROFILES = ("uniform", "fleet", "zones", "halfhour", "rfc3164", "skewed", "direct")
PROFILE_HELP = {
    "uniform": "loadgen's own best case: one timestamp per batch, one form (Z, microseconds)",
    "fleet": "many hosts and apps, each message its own timestamp, the forms of rsyslog, "
    "syslog-ng, apps and RFC 3164 devices, zones from -08:00 to +10:30, sizes with a tail",
    "zones": "fleet, every message from a different zone (all 38 offsets in use)",
    "halfhour": "fleet, only zones that are not whole hours (+05:30, +05:45, -03:30, ...)",
    "rfc3164": "fleet hosts and apps, every message RFC 3164",
    "skewed": "fleet, every sender's clock days off (the relay flags R)",
    "direct": "fleet, each connection carries 1-3 senders (hosts that send directly)",
}
DEFAULT_MEDIAN = 250

# Offsets in minutes east of UTC, with the share of senders in each (fleet).
FLEET_ZONES = ((-480, 8), (-300, 12), (0, 30), (60, 16), (330, 12), (345, 3), (540, 12), (630, 7))
# Every offset in use somewhere on Earth.
ALL_ZONES = (
    -720, -660, -600, -570, -540, -480, -420, -360, -300, -240, -210, -180, -120, -60, 0,
    60, 120, 180, 210, 240, 270, 300, 330, 345, 360, 390, 420, 480, 525, 540, 570, 600,
    630, 660, 720, 765, 780, 840,
)  # fmt: skip
ODD_ZONES = tuple(z for z in ALL_ZONES if z % 60)

# Timestamp forms and their share of senders (fleet).
RSYSLOG, SYSLOG_NG, APP_MS, APP_S, BSD = "rsyslog", "syslog-ng", "app-ms", "app-s", "rfc3164"
FLEET_FORMS = ((RSYSLOG, 40), (SYSLOG_NG, 20), (APP_MS, 25), (APP_S, 10), (BSD, 5))
OFFSET_FORMS = ((RSYSLOG, 50), (SYSLOG_NG, 50))

# (app-name, facility, has a PID)
APPS = (
    ("sshd", 4, True), ("sshd", 10, True), ("sudo", 10, False), ("su", 10, True),
    ("CRON", 9, True), ("anacron", 9, True), ("kernel", 0, False), ("systemd", 3, True),
    ("systemd-logind", 4, True), ("systemd-resolved", 3, True), ("dbus-daemon", 3, True),
    ("NetworkManager", 3, True), ("dhclient", 3, True), ("chronyd", 3, True), ("ntpd", 12, True),
    ("postfix/smtpd", 2, True), ("postfix/qmgr", 2, True), ("dovecot", 2, True),
    ("nginx", 23, True), ("haproxy", 20, True), ("apache2", 23, True), ("named", 3, True),
    ("dnsmasq", 3, True), ("slapd", 20, True), ("mysqld", 3, True), ("postgres", 16, True),
    ("redis-server", 3, True), ("mongod", 3, True), ("kafka", 17, False), ("zookeeper", 17, False),
    ("elasticsearch", 17, False), ("dockerd", 3, True), ("containerd", 3, True),
    ("kubelet", 3, True), ("kube-proxy", 3, True), ("etcd", 3, True), ("vault", 18, False),
    ("consul", 18, False), ("nomad", 18, False), ("app-server", 16, True),
    ("billing-api", 17, True), ("orders", 17, True), ("auth-svc", 10, True),
    ("payments", 18, True), ("search", 19, True), ("rsyslogd", 5, True), ("auditd", 13, True),
    ("polkitd", 10, True), ("snmpd", 3, True), ("zabbix_agentd", 3, True), ("freeradius", 4, True),
    ("openvpn", 3, True), ("strongswan", 3, True), ("squid", 21, True), ("java", 22, True),
    ("python3", 22, True), ("node", 22, True), ("%LINK-3-UPDOWN", 23, False),
    ("%SYS-5-CONFIG_I", 23, False), ("%SEC-6-IPACCESSLOGP", 23, False),
)  # fmt: skip
# Severity weights, emerg..debug: mostly info, some debug and notice, a few errors.
SEVERITIES = (1, 2, 5, 40, 80, 150, 620, 102)
TEXTS = (
    "Accepted publickey for deploy from 10.1.2.3 port 51234 ssh2: ED25519 SHA256:abcdef",
    "Failed password for invalid user admin from 203.0.113.9 port 40022 ssh2",
    "GET /api/v1/orders?id=12345 HTTP/1.1 200 512 0.004 upstream=10.0.0.7:8080",
    'POST /login HTTP/2.0 302 0 0.031 ua="Mozilla/5.0 (X11; Linux x86_64)"',
    "connect from unknown[192.0.2.15] helo=mail.example.net",
    "Started Session 4711 of user alice.",
    "pam_unix(sudo:session): session opened for user root(uid=0) by bob(uid=1000)",
    "eth0: link up, 10000 Mbps, full duplex, flow control rx/tx",
    "Interface GigabitEthernet0/1, changed state to down",
    "list 101 denied tcp 198.51.100.7(51515) -> 10.0.0.1(22), 1 packet",
    "Benutzer Jürgen hat sich angemeldet: Grüße aus Köln",
    "ошибка подключения к базе данных: тайм-аут",
    "ジョブが正常に完了しました (経過時間 1.2 秒)",
    "backend web/srv2 is DOWN, reason: Layer4 timeout, check duration: 2001ms",
    '{"level":"info","ts":1733533323.12,"msg":"request served","status":200,"ms":12}',
    'level=warn msg="slow query" duration=1.72s table=orders rows=18233',
    "Out of memory: Killed process 4242 (java) total-vm:8123456kB",
    "CRON[2211]: (root) CMD (run-parts /etc/cron.hourly)",
    "client 192.0.2.44#53211: query: example.org IN AAAA +E(0)K (10.0.0.53)",
    "WARN  [main] c.e.billing.InvoiceJob - retry 3/5 after HTTP 503 from ledger",
)
SDS = (
    b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]',
    b'[origin ip="192.0.2.1" software="app-server" swVersion="4.2"][meta sequenceId="17"]',
    b'[timeQuality tzKnown="1" isSynced="1"]',
    b'[k8s@53595 ns="payments" pod="payments-7d9f8-x2x4q" container="api"]',
)
MSGIDS = (b"-", b"-", b"-", b"ID47", b"AUDIT", b"REQ", b"TCPOUT")
_MONTHS = b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua user=svc-42 trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067 "
    "path=/var/lib/app/data/part-0001.parquet bytes=1048576 latency_ms=17 retries=0 ok=true "
)
_TABLE = 8191  # prime: seq-indexed tables cycle independently of each other


@dataclass(frozen=True)
class Sender:
    host: bytes
    form: str
    zone: int  # minutes east of UTC (RFC 3164 and Z forms: 0)
    skew: float  # this sender's clock error, seconds
    apps: tuple[tuple[bytes, int, bytes], ...]  # (app-name, facility, procid)


@dataclass(frozen=True)
class Profile:
    name: str
    forms: tuple[tuple[str, int], ...]
    zones: tuple[tuple[int, int], ...]
    per_message_zone: tuple[int, ...] = ()  # cycle through these instead of the sender's
    skew_days: int = 0
    senders_per_conn: int = 0  # 0: every connection carries every sender


_PROFILES = {
    "fleet": Profile("fleet", FLEET_FORMS, FLEET_ZONES),
    "zones": Profile("zones", OFFSET_FORMS, FLEET_ZONES, per_message_zone=ALL_ZONES),
    "halfhour": Profile("halfhour", OFFSET_FORMS, FLEET_ZONES, per_message_zone=ODD_ZONES),
    "rfc3164": Profile("rfc3164", ((BSD, 1),), FLEET_ZONES),
    "skewed": Profile("skewed", FLEET_FORMS, FLEET_ZONES, skew_days=30),
    "direct": Profile("direct", FLEET_FORMS, FLEET_ZONES, senders_per_conn=3),
}
N_SENDERS = 1200


def _host(rng: random.Random, k: int) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b"web-%03d.fra%d.example.com" % (k, rng.randrange(1, 4))
    if kind == 1:
        return b"ip-10-%d-%d-%d.ec2.internal" % (rng.randrange(256), rng.randrange(256), k % 256)
    if kind == 2:
        return b"sw-core-%d" % k
    if kind == 3:
        return b"db%04d" % k
    if kind == 4:
        return b"k8s-node-%d.prod.eu-west-1.example.net" % k
    return b"host%d" % k


def _pick(rng: random.Random, weighted: Sequence[tuple[object, int]]) -> object:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


@functools.lru_cache(maxsize=16)
def senders(profile: str, seed: int) -> tuple[Sender, ...]:
    """The fleet: ``N_SENDERS`` hosts, each with a form, a zone, a clock and 1-6 apps."""
    p = _PROFILES[profile]
    rng = random.Random(seed * 7_777_777 + 17)
    out = []
    for k in range(N_SENDERS):
        form = str(_pick(rng, p.forms))
        zone = 0 if form in (APP_MS, APP_S, BSD) else int(str(_pick(rng, p.zones)))
        skew = rng.uniform(-2.0, 2.0)  # NTP'd clocks are close, not equal
        if p.skew_days:
            skew += rng.choice((-1, 1)) * rng.uniform(1, p.skew_days) * 86400
        apps = tuple(
            (name.encode(), fac, b"%d" % rng.randrange(100, 65536) if pid else b"-")
            for name, fac, pid in rng.sample(APPS, rng.randrange(1, 7))
        )
        out.append(Sender(_host(rng, k), form, zone, skew, apps))
    return tuple(out)


@dataclass(frozen=True)
class _Slot:
    """Everything about a message but its timestamp and sequence number."""

    pre: bytes  # b"<PRI>1 " or b"<PRI>"
    mid: bytes  # after the timestamp, up to "seq="
    tail: bytes  # after the sequence number: text and filler to the slot's size
    form: str
    zone: int
    skew: float


@functools.lru_cache(maxsize=64)
def _slots(profile: str, seed: int, conn: int, median: int, max_size: int) -> tuple[_Slot, ...]:
    """``_TABLE`` message shapes for one connection; message ``seq`` takes slot ``seq % _TABLE``."""
    p = _PROFILES[profile]
    fleet = senders(profile, seed)
    filler = _filler()
    rng = random.Random(seed * 1_000_003 + conn * 7 + 3)
    pool = range(N_SENDERS)
    if p.senders_per_conn:
        first = conn * p.senders_per_conn % N_SENDERS
        pool = range(first, first + 1 + conn % p.senders_per_conn)
    # A few senders are chatty, most are quiet (Zipf-like weights).
    order = list(pool)
    rng.shuffle(order)
    weights = [1.0 / (1 + r) ** 0.8 for r in range(len(order))]
    # Sizes: log-normal around the median, with a tail to 8x it (2 KB at 250 B).
    mu, lo, hi = math.log(median), 60, max(2048, median * 2)
    if max_size:
        hi = min(hi, max_size)
    picks = rng.choices(order, weights, k=_TABLE)
    sevs = rng.choices(range(8), SEVERITIES, k=_TABLE)
    out = []
    for slot in range(_TABLE):
        s = fleet[picks[slot]]
        app, fac, procid = s.apps[slot % len(s.apps)]
        pri = fac * 8 + sevs[slot]
        text = TEXTS[rng.randrange(len(TEXTS))].encode()
        if s.form == BSD:
            tag = b"%s[%s]:" % (app, procid) if procid != b"-" else app + b":"
            pre, mid = b"<%d>" % pri, b" %s %s seq=" % (s.host, tag)
            stamp_len = 15
        else:
            sd = rng.choice(SDS) if rng.random() < 0.25 else b"-"
            msgid = rng.choice(MSGIDS)
            pre = b"<%d>1 " % pri
            mid = b" %s %s %s %s %s seq=" % (s.host, app, procid, msgid, sd)
            stamp_len = 32
        want = min(hi, max(lo, int(rng.lognormvariate(mu, 0.6))))
        tail = b" " + text
        room = want - len(pre) - stamp_len - len(mid) - 10 - len(tail) - 1
        if room > 0:
            at = rng.randrange(len(filler) - room)
            tail += b" " + filler[at : at + room]
        out.append(_Slot(pre, mid, tail, s.form, s.zone, s.skew))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _filler() -> bytes:
    words = (_WORDS * 40).encode()
    rng = random.Random(5)
    parts = [words[i : i + rng.randrange(5, 40)] for i in range(0, len(words), 23)]
    rng.shuffle(parts)
    text = b" ".join(parts).replace(b"\n", b" ")
    while len(text) < 1 << 20:
        text += b" " + text
    return text


@functools.lru_cache(maxsize=128)
def zone_text(minutes: int) -> bytes:
    sign = b"-" if minutes < 0 else b"+"
    return b"%s%02d:%02d" % (sign, abs(minutes) // 60, abs(minutes) % 60)


_seconds: dict[tuple[int, int, bool], bytes] = {}


def _second(sec: int, zone: int, bsd: bool) -> bytes:
    """The timestamp text down to the second, in ``zone``; cached (formatting costs)."""
    key = (sec, zone, bsd)
    got = _seconds.get(key)
    if got is None:
        if len(_seconds) > 100_000:
            _seconds.clear()
        t = time.gmtime(sec + zone * 60)
        if bsd:
            got = b"%s %2d %02d:%02d:%02d" % (
                _MONTHS[t.tm_mon - 1], t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec
            )  # fmt: skip
        else:
            got = b"%04d-%02d-%02dT%02d:%02d:%02d" % (
                t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec
            )  # fmt: skip
        _seconds[key] = got
    return got


def generate(
    profile: str,
    seed: int,
    conn: int,
    seqs: Iterable[int],
    median: int = DEFAULT_MEDIAN,
    start: float | None = None,
    step: float = 1e-6,
    max_size: int = 0,
) -> list[bytes]:
    """The messages (without framing) for ``seqs``, the k-th stamped ``start + k * step``.

    Every message carries `` seq=NNNNNNNNNN `` (see relay.tools.loadgen); ``max_size``
    caps sizes (UDP), 0 leaves them. ``start`` defaults to now.
    """
    slots = _slots(profile, seed, conn, median, max_size)
    cycle = _PROFILES[profile].per_message_zone
    t0 = time.time() if start is None else start
    out: list[bytes] = []
    append = out.append
    for k, seq in enumerate(seqs):
        s = slots[seq % _TABLE]
        t = t0 + k * step + s.skew
        sec = int(t)
        form = s.form
        if form == RSYSLOG or form == SYSLOG_NG:
            zone = cycle[seq % len(cycle)] if cycle else s.zone
            base = _second(sec, zone, False)
            if form == RSYSLOG:
                ts = b"%s.%06d%s" % (base, (t - sec) * 1e6, zone_text(zone))
            else:
                ts = base + zone_text(zone)
        elif form == APP_MS:
            ts = b"%s.%03dZ" % (_second(sec, 0, False), (t - sec) * 1e3)
        elif form == APP_S:
            ts = _second(sec, 0, False) + b"Z"
        else:
            ts = _second(sec, 0, True)
        append(b"%s%s%s%010d%s" % (s.pre, ts, s.mid, seq, s.tail))
    return out
