"""The installation the end-to-end, fault and fuzz tests run: the daemon as a real subprocess
(`python -m daemon --demo`) on a temporary inbox/outbox, its JSON log lines parsed as they come,
real job folders made from a real photo. Nothing is mocked."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.paths import REPO

# The fast stage mode of the daemon tests is job.toml itself (smaller than tests.harness.jobs.FAST_JOB):
# one 64 px prepared image per photo, one training step at the demo model's 128 px, one seed, two render steps.
FAST_JOB = """\
[prepare]
size = 64
rotations = []
crops = []
remove_background = false

[train]
max_steps = 1
resolution = 128

[verify]
seeds = 1
steps = 1
batch_size = 1

[[render]]
prompt = "portrait in a garden"
count = 1
steps = 2
"""


def write_config(folder: Path, models: Path, extra_toml: str = "", **daemon: Any) -> Path:
    """config.toml in `folder`: a models folder without face models (the embedded ones are used),
    `extra_toml` (other tables, as TOML text) and a [daemon] table."""
    lines = ["[paths]", f"models = {json.dumps(str(models))}", "", extra_toml, "[daemon]"]
    for key, value in daemon.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def photo_bytes() -> bytes:
    """scikit-image's astronaut as PNG bytes (one face)."""
    from skimage import data

    from engine.images import png_bytes

    return png_bytes(data.astronaut())


def drop_job(inbox: Path, name: str, *, job_toml: str = FAST_JOB, photos: dict[str, bytes] | None = None, ready_marker: bool = True) -> Path:
    """Write a job folder the way a careful lab does: photos, job.toml, then READY (optional)."""
    folder = inbox / name
    folder.mkdir(parents=True)
    for photo_name, data in (photos if photos is not None else {"photo.png": photo_bytes()}).items():
        (folder / photo_name).write_bytes(data)
    (folder / "job.toml").write_text(job_toml, encoding="utf-8")
    if ready_marker:
        (folder / "READY").write_bytes(b"")
    return folder


def parse_ts(event: dict[str, Any]) -> float:
    """A log line's timestamp as epoch seconds."""
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def audit_events(job_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job_dir / "audit.jsonl").read_text(encoding="utf-8").splitlines()]


class Daemon:
    """One `python -m daemon` process; its stdout JSON lines are collected in `events`."""

    def __init__(self, config: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None, name: str = "daemon",
                 demo: bool = True, prefix: tuple[str, ...] = ()) -> None:
        self.name = name
        environment = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_PAUSE")}
        environment.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.stderr_path = log_dir / f"{name}.{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "daemon", "--config", str(config), *(["--demo"] if demo else []), *args],
            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.raw.append(line)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass  # not JSON: kept in raw; test_logs_are_json checks there is none

    def named(self, event: str, after: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Its log lines of `event` with these fields (only those after line number `after`: see `mark`)."""
        with self._lock:
            return [e for e in self.events[after:] if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def mark(self) -> int:
        """How many log lines so far: `wait_for(..., after=mark)` waits for a line logged from now on."""
        with self._lock:
            return len(self.events)

    def wait_for(self, event: str, timeout: float = 60, where: Callable[[dict[str, Any]], bool] | None = None, after: int = 0,
                 **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.named(event, after, **fields) if where is None or where(e)]
            if found:
                return found[0]
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader drain the last lines
                found = [e for e in self.named(event, after, **fields) if where is None or where(e)]
                if found:
                    return found[0]
                raise AssertionError(f"{self.name} exited ({self.process.returncode}) before logging {event} {fields}\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not log {event} {fields} within {timeout} s\n{self.tail()}")

    def wait_started(self, timeout: float = 90) -> "Daemon":
        self.wait_for("daemon_started", timeout)
        return self

    @property
    def metrics_url(self) -> str:
        port = self.named("metrics_listening")[0]["port"]
        return f"http://127.0.0.1:{port}/metrics"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as 'name{label="v",...}' -> value (labels sorted)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout} s\n{self.tail()}") from None
        self._reader.join(timeout=5)
        self._stderr.close()
        return code

    def tail(self, lines: int = 25) -> str:
        with self._lock:
            out = "".join(self.raw[-lines:])
        err = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path.exists() else ""
        return f"--- {self.name} stdout (last {lines} lines) ---\n{out}--- stderr ---\n{err}"


class Lab:
    """A temporary installation: config.toml, inbox/, outbox/, failed/, work/, and its daemons."""

    def __init__(self, root: Path, models: Path) -> None:
        self.root = root
        self.models = models
        self.inbox, self.outbox, self.failed, self.work = (root / n for n in ("inbox", "outbox", "failed", "work"))
        self.daemons: list[Daemon] = []
        self.config: Path | None = None

    def configure(self, extra_toml: str = "", **daemon: Any) -> Path:
        settings = {"stable_seconds": 1.5, "scan_seconds": 1.0, "lease_seconds": 2.0, "metrics_port": 0, **daemon}
        self.config = write_config(self.root, self.models, extra_toml, **settings)
        return self.config

    def start(self, *args: str, name: str = "daemon", env: dict[str, str] | None = None, wait: bool = True, demo: bool = True,
              prefix: tuple[str, ...] = ()) -> Daemon:
        """A daemon; `prefix` runs it through a command (e.g. setpriv, to drop capabilities)."""
        if self.config is None:
            self.configure()
        daemon = Daemon(self.config, self.root, *args, env=env, name=name, demo=demo, prefix=prefix)
        self.daemons.append(daemon)
        return daemon.wait_started() if wait else daemon

    def finished_jobs(self) -> dict[str, list[Path]]:
        """subject -> its job folders in the outbox."""
        return {p.name: sorted(q for q in p.iterdir() if q.is_dir()) for p in sorted(self.outbox.iterdir()) if p.is_dir() and not p.name.startswith(".")}

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                tails = "\n".join(d.tail(10) for d in self.daemons)
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tails}")
            time.sleep(0.1)

    def stop_all(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGKILL)
                daemon.process.wait(30)
            daemon._stderr.close()
