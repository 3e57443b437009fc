"""`make run`: a relay, an archiver and a local S3 server (SeaweedFS) on 127.0.0.1.

Everything lives under .run/ in the checkout. Prints how to send a message and
where to look; runs until Ctrl-C (or, with --smoke, checks that a message goes
all the way into the archive and exits).

It stops everything it started however it ends: Ctrl-C, SIGTERM, or SIGHUP when
its terminal goes away (each stops the children in order, then exits), and a
SIGKILL of the demo itself (the children run with a parent-death signal and
stop on their own). The children's process ids are in RUN_DIR/pids.
"""

from __future__ import annotations

import argparse
import ctypes
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
state_dir = "{run / "state"}"
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


class Stop(Exception):
    """A signal asked the demo to stop."""


def _stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the demo dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _say(text: str, **kw: object) -> None:
    """print, but a terminal that went away (EIO, EPIPE) must not stop the clean-up."""
    try:
        print(text, flush=True, **kw)  # type: ignore[call-overload]
    except OSError:
        pass


def send(msg: bytes, port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"%d %s" % (len(msg), msg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--smoke", action="store_true", help="send one message, wait for it in S3, exit"
    )
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--run-dir", type=Path, default=ROOT / ".run", help="default: .run/")
    args = ap.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)

    run: Path = args.run_dir
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    py = sys.executable
    s3 = SeaweedServer(find_weed(), run / "seaweed", preexec=_die_with_parent)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _say("starting SeaweedFS (weed mini) on 127.0.0.1 ...")
        s3.start()
        s3.client().create_bucket(Bucket=BUCKET)
        cfg = write_config(run, s3, args.port)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for name in ("relay", "archive"):
            with open(run / f"{name}.log", "ab") as log:  # the child keeps its own copy
                procs.append(
                    subprocess.Popen(
                        [py, "-m", name, "run", "--config", str(cfg)],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        # Own session: terminal signals reach the demo only, which
                        # stops the children itself (a SIGHUP would reload the relay).
                        start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
                )
        assert s3.proc is not None
        (run / "pids").write_text(
            f"relay {procs[0].pid}\narchive {procs[1].pid}\nweed {s3.proc.pid}\n"
        )
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
        _say(
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

Ctrl-C stops everything (so does closing the terminal)."""
        )
        if args.smoke:
            # What the banner promises: the current hour, read from local staging at
            # once (a few tries: the relay writes it on its own thread, on a busy host).
            deadline = time.monotonic() + 10
            while True:
                now = subprocess.run(
                    [py, "-m", "archive", "cat", "--config", str(cfg), "--since=-1m",
                     "--host", "demo"],
                    env=env, capture_output=True, timeout=60,
                )  # fmt: skip
                seen = b"relay is up" in now.stdout and b"from local staging" in now.stderr
                if seen or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not seen:
                print("smoke: cat --since=-1m does not show the message just sent", file=sys.stderr)
                sys.stderr.write(now.stderr.decode(errors="replace")[-2000:])
                return 1
            _say("smoke: the message just sent is read from local staging")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = subprocess.run(
                    [py, "-m", "archive", "cat", "--config", str(cfg), "--from=-3h", "--to=now",
                     "--staging", "no"],
                    env=env, capture_output=True, timeout=60,
                )  # fmt: skip
                if b"hello from the previous hour" in out.stdout:
                    _say("smoke: the message is in the archive")
                    return 0
                time.sleep(1)
            print("smoke: message not archived within 60 s", file=sys.stderr)
            sys.stderr.write(out.stderr.decode(errors="replace")[-2000:])
            return 1
        while all(p.poll() is None for p in procs):
            time.sleep(1)  # a signal interrupts this with Stop
        _say(f"a daemon exited; see {run}/relay.log and {run}/archive.log", file=sys.stderr)
        return 1
    except Stop as why:
        _say(f"{why}: stopping ...")
        return 0
    finally:
        # Stop again means the same: finish the clean-up, not abandon it half way.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        s3.stop()
        _say("stopped.")


if __name__ == "__main__":
    sys.exit(main())
