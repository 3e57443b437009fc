"""`make run`: a relay, an archiver and a local S3 server (SeaweedFS) on 127.0.0.1.

Everything lives under .run/ in the checkout. Prints how to send a message and
where to look; runs until Ctrl-C (or, with --smoke, checks that a message goes
all the way into the archive and exits).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.seaweed import SeaweedServer, find_weed  # noqa: E402

PORT = 5514
BUCKET = "syslog-archive"


def write_config(run: Path, s3: SeaweedServer, port: int) -> Path:
    cfg = run / "syslog-relay.toml"
    cfg.write_text(
        f"""# Written by `make run` (tools/demo.py); see etc/syslog-relay.toml for every key.
[relay]
id = "demo"
state_dir = "{run / 'state'}"
log_format = "text"

[[listen]]
address = "127.0.0.1:{port}"
transport = "tcp"

[[listen]]
address = "127.0.0.1:{port}"
transport = "udp"

[staging]
fsync_interval = "1s"

[archive]
enabled = true
grace = "10s"
bucket = "{BUCKET}"
prefix = "syslog"
endpoint_url = "{s3.endpoint}"
access_key_id = "{s3.access_key}"
secret_access_key = "{s3.secret_key}"
poll_interval = "2s"
"""
    )
    return cfg


def send(msg: bytes, port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"%d %s" % (len(msg), msg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="send one message, wait for it in S3, exit")
    ap.add_argument("--port", type=int, default=PORT)
    args = ap.parse_args()

    run = ROOT / ".run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir()
    py = sys.executable
    s3 = SeaweedServer(find_weed(), run / "seaweed")
    print("starting SeaweedFS (weed mini) on 127.0.0.1 ...", flush=True)
    s3.start()
    s3.client().create_bucket(Bucket=BUCKET)
    cfg = write_config(run, s3, args.port)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    relay_log = open(run / "relay.log", "ab")  # noqa: SIM115 - lives as long as the child
    archive_log = open(run / "archive.log", "ab")  # noqa: SIM115
    procs = [
        subprocess.Popen([py, "-m", "relay", "run", "--config", str(cfg)], env=env,
                         stdout=relay_log, stderr=subprocess.STDOUT),
        subprocess.Popen([py, "-m", "archive", "run", "--config", str(cfg)], env=env,
                         stdout=archive_log, stderr=subprocess.STDOUT),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                send(b"<14>1 - demo make-run - - - relay is up", args.port)
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    print(f"relay did not start; see {run / 'relay.log'}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        # A message stamped in the previous hour goes to a late part, closed
        # after `grace` (10 s here), so the archive shows something right away.
        prev = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        send(f"<14>1 {prev} demo make-run - - - hello from the previous hour".encode(), args.port)
        sa = f"{py} -m archive"
        print(
            f"""
syslog-relay is running (logs: {run}/relay.log, {run}/archive.log)
  relay     tcp+udp 127.0.0.1:{args.port}, staging in {run}/state/staging/
  archiver  bucket s3://{BUCKET} at {s3.endpoint} (SeaweedFS, data in {run}/seaweed)
  config    {cfg}

Send a message:
  logger --tcp --octet-count --rfc5424 -n 127.0.0.1 -P {args.port} "hello relay"
  logger --udp -n 127.0.0.1 -P {args.port} "hello over udp"

See it a second later (read from local staging until its hour is archived):
  {sa} cat    --config {cfg} --since=-1m --host "$(hostname)"
  {sa} tail   --config {cfg} -f

See the archive (an hour is archived after it ends plus 10 s of grace; a demo
message stamped in the previous hour is there within about 15 seconds):
  {sa} ls     --config {cfg} --from=-3h --to=now
  {sa} cat    --config {cfg} --from=-3h --to=now
  {sa} verify --config {cfg} --from=-3h --to=now

Ctrl-C stops everything.""",
            flush=True,
        )
        if args.smoke:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = subprocess.run(
                    [py, "-m", "archive", "cat", "--config", str(cfg), "--from=-3h", "--to=now",
                     "--staging", "no"],
                    env=env, capture_output=True, timeout=60,
                )  # fmt: skip
                if b"hello from the previous hour" in out.stdout:
                    print("smoke: the message is in the archive", flush=True)
                    return 0
                time.sleep(1)
            print("smoke: message not archived within 60 s", file=sys.stderr)
            sys.stderr.write(out.stderr.decode(errors="replace")[-2000:])
            return 1
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        s3.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
