"""The receiver's journal: a relay link batch is in staging and every spool exactly once
whatever instant the process dies at (relay.link.ledger: intent, data, commit mark)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relay.disk.spool import LANE_DIR, Spool
from relay.disk.staging import StagingStore
from relay.formats import staging_block
from relay.link import wire
from relay.link.ledger import CommitLog, Mark, roll_back

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0
H = int(NOW // 3600)
KEY = ("edge", 3)

# The child writes batch 1 (committed, synced), then batch 2 (hours H and H + 1: one
# part appended to, one created) and dies with os._exit at the instant ``mode`` names.
CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from relay.formats import octet, staging_block
    from relay.link import ledger
    from relay.ops.metrics import Metrics
    from relay.disk.spool import Spool
    from relay.disk.staging import StagingStore
    from relay.disk.durable_writer import DurableWriter
    from tests.support.threadreactor import ThreadReactor

    root, mode = Path(sys.argv[1]), sys.argv[2]
    NOW = 1_800_000_000.0
    H = int(NOW // 3600)
    KEY = ("edge", 3)
    laned = len(sys.argv) > 3  # a link output's spool: batch 2 takes its second lane
    if laned:
        from relay.link.lanes import LanedSpool
        spool = LanedSpool(root / "spool", 1 << 24, live_lane_after=2.0,
                           make=lambda *a, **kw: Spool(*a, segment_size=4096, **kw))
    else:
        spool = Spool(root / "spool", 1 << 24, segment_size=4096)
    spool.open()
    commits = ledger.CommitLog(root / "link")
    commits.open()
    reactor = ThreadReactor()
    writer = DurableWriter(
        StagingStore(root / "staging", "r", grace=300), reactor, Metrics(), 0.05, 1 << 24,
        lambda: None, lambda: None, clock=lambda: NOW, spools={"s": spool},
    )
    writer.journal = commits
    writer.add_syncer(commits.sync)
    writer.start()

    def batch(n, lo, hours):
        msgs = [b"<14>1 - h a - - - batch%d m%04d" % (n, i) for i in range(lo, lo + 300)]
        part = [msgs[k :: len(hours)] for k in range(len(hours))]
        blocks = {h: [(staging_block.FRAMING_OCTET, b"-", len(m), octet.encode_many(m))]
                  for h, m in zip(hours, part)}
        return blocks, msgs

    done = []
    blocks, forward = batch(1, 0, [H])
    writer.submit_chunk(blocks, forward, NOW, lambda: done.append(1), commit=(KEY, 300))
    reactor.pump_until(lambda: done == [1])

    def die(*args, **kw):
        os._exit(9)

    if mode == "mid-data":
        Spool.append = die  # staging written, the spool not
    elif mode == "before-commit":
        ledger.CommitLog.commit = die  # staging and spool written, no commit mark
    elif mode == "after-commit":
        StagingStore.sync = die  # commit mark written, nothing fsynced
    blocks, forward = batch(2, 300, [H, H + 1])
    later = NOW + 10 if laned else NOW
    writer.submit_chunk(blocks, forward, later, lambda: done.append(2), commit=(KEY, 600))
    reactor.pump_until(lambda: False, timeout=20)
    """
)


def staged(root: Path) -> list[bytes]:
    out = []
    for f in sorted((root / "staging").rglob("*.stg")):
        data = f.read_bytes()
        out += [r.msg for _, r in staging_block.iter_records(data, data.index(b"\n") + 1)]
    return out


def spooled(root: Path, lanes: int = 1) -> list[bytes]:
    out = []
    for d in [root / "spool", root / "spool" / LANE_DIR][:lanes]:
        spool = Spool(d, 1 << 24, segment_size=4096)
        spool.open()
        try:
            for r in spool.read(10_000, 1 << 30):
                payload = wire.open_record(r.payload)[1]
                out += staging_block.split_payload(payload, staging_block.FRAMING_OCTET)
        finally:
            spool.close()
    return out


@pytest.mark.parametrize("laned", [False, True], ids=["spool", "laned-spool"])
@pytest.mark.parametrize("mode", ["mid-data", "before-commit", "after-commit"])
def test_a_batch_is_kept_whole_or_not_at_all_whenever_the_process_dies(
    tmp_path: Path, mode: str, laned: bool
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode] + (["laned"] if laned else []),
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 9, proc.stderr.decode()
    # What a restart does, in its order: roll back, then recover staging and spools.
    undone = roll_back(tmp_path / "link")
    assert roll_back(tmp_path / "link") == []  # done once: marked aborted
    positions = CommitLog(tmp_path / "link").open()
    StagingStore(tmp_path / "staging", "r", grace=300).recover(NOW)
    first = [b"<14>1 - h a - - - batch1 m%04d" % i for i in range(300)]
    second = [b"<14>1 - h a - - - batch2 m%04d" % i for i in range(300, 600)]
    lanes = 2 if laned else 1
    if laned:
        # Batch 1 in lane 1, batch 2 (10 s later, batch 1 unread) in lane 2.
        assert spooled(tmp_path, 1) == first
    if mode == "after-commit":
        # Written and marked: known, so the resent batch is acknowledged, not written.
        assert undone == []
        assert positions == {KEY: 600}
        assert sorted(staged(tmp_path)) == sorted(first + second)
        assert spooled(tmp_path, lanes) == first + second
    else:
        assert undone, "the open intent was rolled back"
        assert positions == {KEY: 300}  # the resent batch 2 is written again, once
        assert sorted(staged(tmp_path)) == sorted(first)
        assert spooled(tmp_path, lanes) == first
        # The part that batch 2 created for hour H + 1 is gone, not left empty.
        assert not any("T" + f"{(H + 1) % 24:02d}--" in p.name for p in tmp_path.rglob("*.stg"))


def test_held_records_are_not_read_until_released(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, segment_size=1024)
    spool.open()
    spool.append([b"a"], NOW)
    [(path, size)] = spool.hold()
    assert path.parent == tmp_path and size > 0
    spool.append([b"b" * 600], NOW)
    spool.append([b"c" * 600], NOW)  # rolls to a new segment, held too
    assert [r.payload for r in spool.read(10, 1 << 20)] == [b"a"]
    assert spool.read(10, 1 << 20) == []
    spool.release()
    assert [r.payload for r in spool.read(10, 1 << 20)] == [b"b" * 600, b"c" * 600]
    spool.close()


def test_roll_back_of_a_spool_removes_the_segments_made_after_the_mark(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 1 << 20, segment_size=1024)
    spool.open()
    spool.append([b"kept"], NOW)
    [(path, size)] = spool.hold()
    log = CommitLog(tmp_path / "link")
    log.open()
    log.begin([Mark("spool", str(path), size)])
    for _ in range(4):
        spool.append([b"x" * 700], NOW)
    spool.close()
    assert len(list((tmp_path / "s").glob("*.seg"))) > 1
    assert roll_back(tmp_path / "link")
    assert len(list((tmp_path / "s").glob("*.seg"))) == 1
    again = Spool(tmp_path / "s", 1 << 20, segment_size=1024)
    again.open()
    assert [r.payload for r in again.read(10, 1 << 20)] == [b"kept"]
    again.close()


def test_an_intent_survives_a_compaction_while_its_batch_is_open(tmp_path: Path) -> None:
    log = CommitLog(tmp_path)
    log.open()
    part = tmp_path / "part.stg"
    part.write_bytes(b"header\n")
    log.begin([Mark("staging", str(part), 7)])
    log._rewrite()  # what sync() does past 4 MiB, between begin and commit
    part.write_bytes(b"header\nhalf a batch")
    log.close()
    assert roll_back(tmp_path) == [f"cut {part} from 19 to 7 bytes"]
    assert part.read_bytes() == b"header\n"
