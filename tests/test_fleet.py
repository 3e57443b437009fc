"""relay.tools.fleet: the load generator's fleet-like traffic is what the issue asks it to be."""

from __future__ import annotations

import itertools
import re
import statistics
import time
from collections import Counter
from datetime import UTC

import pytest

from relay.framing.hour_runs import HourIndex
from relay.tools import fleet, loadgen

STAMP = re.compile(
    rb"^<(\d+)>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)) (\S+) (\S+) (\S+) (\S+) "
)
BSD = re.compile(rb"^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (\S+) (\S+) seq=")


def sample(profile: str, n: int = 20_000, conn: int = 0, **kw: object) -> list[bytes]:
    spec = loadgen.LoadSpec(profile=profile, count=n, **kw)  # type: ignore[arg-type]
    return loadgen.generate(spec, conn, range(n))


def test_fleet_mix() -> None:
    msgs = sample("fleet")
    hosts, apps, zones, forms, pris = set(), set(), Counter(), Counter(), Counter()
    stamps = []
    for m in msgs:
        m.decode("utf-8")
        assert len(loadgen.SEQ_RE.findall(m)) == 1
        hit = STAMP.match(m)
        if hit:
            pri, stamp, frac, zone, host, app = hit.group(1, 2, 3, 4, 5, 6)
            forms[(len(frac or b""), zone == b"Z")] += 1
            zones[zone] += 1
            stamps.append(stamp)
        else:
            bsd = BSD.match(m)
            assert bsd, m[:80]
            pri, host, app = bsd.group(1), bsd.group(3), bsd.group(4)
            forms["3164"] += 1
        hosts.add(host)
        apps.add(app.split(b"[")[0].rstrip(b":"))
        pris[int(pri)] += 1
    n = len(msgs)
    assert len(hosts) >= 1000 and len(apps) >= 50
    assert len({p >> 3 for p in pris}) >= 15 and len({p & 7 for p in pris}) == 8
    for z in (b"-08:00", b"-05:00", b"+00:00", b"+01:00", b"+05:30", b"+05:45", b"+09:00"):
        assert zones[z] > 0, z
    assert zones[b"+10:30"] > 0 and zones[b"Z"] > 0
    # rsyslog (µs, offset), syslog-ng (s, offset), apps (ms Z, s Z), RFC 3164 ~5%
    assert forms[(7, False)] > 0.3 * n and forms[(0, False)] > 0.1 * n
    assert forms[(4, True)] > 0.15 * n and forms[(0, True)] > 0.05 * n
    assert 0.02 * n < forms["3164"] < 0.1 * n
    assert any(b"] seq=" in m for m in msgs)  # structured data on some
    sizes = [len(m) for m in msgs]
    assert 200 <= statistics.median(sizes) <= 300
    assert min(sizes) >= 60 and max(sizes) <= 2048
    assert sum(s > 1000 for s in sizes) > 0.002 * n  # a tail
    # Every message its own timestamp (fractional forms), advancing.
    micro = [s for s in stamps if len(s) == 32]
    assert len(set(micro)) > 0.99 * len(micro)


def test_timestamps_advance_in_real_time() -> None:
    t0 = time.time()
    spec = loadgen.LoadSpec(profile="fleet", count=10, rate=10.0)
    msgs = loadgen.generate(spec, 0, range(0, 10))
    index = HourIndex(UTC, 3600.0)
    index.at(t0)
    # 1/rate apart: the whole batch spans about a second, within the same hour or the next
    assert all(index.classify(m)[1] == b"-" for m in msgs)


@pytest.mark.parametrize("profile", ["zones", "halfhour"])
def test_zone_profiles(profile: str) -> None:
    msgs = sample(profile, 2000)
    zones = [z.group(1) for m in msgs if (z := re.search(rb"[\d.](Z|[+-]\d\d:\d\d) ", m))]
    offsets = [z for z in zones if z != b"Z"]
    if profile == "zones":
        assert len(set(offsets)) == len(fleet.ALL_ZONES)
        pairs = list(itertools.pairwise(offsets))
        assert sum(a != b for a, b in pairs) > 0.9 * len(pairs)
    else:
        assert offsets and all(not z.endswith(b":00") for z in offsets)


def test_rfc3164_profile() -> None:
    assert all(BSD.match(m) for m in sample("rfc3164", 2000))


def test_skewed_profile_is_flagged_r() -> None:
    index = HourIndex(UTC, 3600.0)
    index.at(time.time())
    flags = Counter(index.classify(m)[1] for m in sample("skewed", 2000))
    assert flags[b"R"] > 0.95 * 2000


def _host(m: bytes) -> bytes:
    hit = STAMP.match(m) or BSD.match(m)
    assert hit is not None
    return hit.group(5) if hit.re is STAMP else hit.group(3)


def test_direct_profile_few_senders_per_connection() -> None:
    for conn in range(4):
        assert 1 <= len({_host(m) for m in sample("direct", 500, conn)}) <= 3


def test_sizes_follow_the_median_asked_for() -> None:
    sizes = [len(m) for m in sample("fleet", 4000, size=1024)]
    assert 900 <= statistics.median(sizes) <= 1150
    udp = [len(m) for m in sample("fleet", 2000, size=8192, transport="udp")]
    assert max(udp) <= 8192
