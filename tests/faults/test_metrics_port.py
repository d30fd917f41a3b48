"""Nothing that connects to the /metrics port can jam it or hold up the daemon's stop.

It was wsgiref's server on a pool of 4 threads with a timeout on every read. From localhost,
~150 connections that sent a request line and one header and then nothing made every fresh
scrape time out for as long as they stayed, and so did 4 clients sending one byte every 2 s (each
byte reset the timeout). With those 4 connected, SIGTERM logged stop_requested and the daemon
never exited (the server's loop waited for a free thread, its shutdown for the loop): under
docker compose, a SIGKILL mid-job.

The jamming clients are raw sockets, connected without blocking: against a server that stops
accepting, a blocking connect would hang the test instead of failing it."""

from __future__ import annotations

import errno
import gzip
import http.client
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import METRICS_MAX_CONNECTIONS, METRICS_MAX_HEAD_BYTES, METRICS_REQUEST_SECONDS, DaemonMetrics

SLOW_LORIS = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"  # ...and then nothing: the head never ends
TRICKLE_SECONDS = 2.0  # a trickling client sends one byte this often
SCRAPE_SECONDS = 1.0  # a fresh scrape answers within this, whatever else is connected


@pytest.fixture()
def server() -> Iterator[tuple[DaemonMetrics, int]]:
    metrics = DaemonMetrics("faults")
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, port
    metrics.close()


@contextmanager
def connections(port: int, count: int, say: bytes, host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """`count` connections to the port, each having said `say` once connected (within 2 s);
    all closed after the block."""
    opened: list[socket.socket] = []
    try:
        with selectors.DefaultSelector() as selector:
            for _ in range(count):
                connection = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                opened.append(connection)
                connection.setblocking(False)
                if connection.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
                    raise AssertionError(f"cannot connect to {host}:{port}")
                selector.register(connection, selectors.EVENT_WRITE)
            deadline = time.monotonic() + 2.0
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(deadline - time.monotonic()):
                    selector.unregister(key.fileobj)
                    if say and key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        key.fileobj.send(say)
        yield opened
    finally:
        for connection in opened:
            connection.close()


def let_go(connection: socket.socket) -> bool:
    """Whether the server closed (or answered) this connection."""
    try:
        connection.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False  # open, nothing to read
    except OSError:
        return True  # reset
    return True  # data or the end of the stream


def trickle(connection: socket.socket, byte: bytes) -> None:
    """Send one more byte, unless the server has let the connection go."""
    try:
        connection.send(byte)
    except OSError:
        pass  # reset by the server: let_go says so


def scrape(port: int, method: str = "GET", path: str = "/metrics", headers: dict[str, str] | None = None,
           host: str = "127.0.0.1") -> tuple[float, int, dict[str, str], bytes]:
    """(seconds to the whole answer, status, headers by lower-case name, body)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
    except OSError as exc:
        raise AssertionError(f"{method} {path} got no answer within 5 s ({exc!r}): the port is jammed") from None
    finally:
        connection.close()
    return time.monotonic() - started, response.status, {name.lower(): value for name, value in response.getheaders()}, body


def raw_request(port: int, request: bytes) -> bytes:
    """What the server sends back to `request`, up to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_a_scrape_answers_within_a_second_while_200_slow_loris_connections_stay_open(server):
    _metrics, port = server
    with connections(port, 200, SLOW_LORIS) as silent:
        seconds, status, _headers, body = scrape(port)
        assert status == 200 and b"idrep_jobs_total" in body
        assert seconds < SCRAPE_SECONDS, f"a scrape took {seconds:.2f} s with 200 slow-loris connections open"
        # The oldest made room for the newer ones; the newest are still held, within their deadline.
        dropped = sum(map(let_go, silent))
        assert 200 - METRICS_MAX_CONNECTIONS <= dropped < 200, dropped


def test_only_get_and_head_of_metrics_are_served(server):
    _metrics, port = server
    _, status, headers, body = scrape(port, path="/metrics?debug=1")
    assert status == 200 and headers["connection"] == "close" and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert {"idrep_jobs", "idrep_ready", "idrep_gpu_memory_bytes", "idrep_stage_duration_seconds"} <= set(families)
    assert int(headers["content-length"]) == len(body)

    _, status, head_headers, head_body = scrape(port, method="HEAD")
    assert status == 200 and head_body == b"" and head_headers["content-length"] == headers["content-length"]

    _, status, headers, body = scrape(port, path="/")
    assert status == 404
    _, status, headers, _ = scrape(port, method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert raw_request(port, b"BREW /metrics\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_request(port, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"x" * METRICS_MAX_HEAD_BYTES + b"\r\n\r\n"
    assert raw_request(port, huge).startswith(b"HTTP/1.1 431 ")

    # As prometheus_client's own server: OpenMetrics when asked, gzip when accepted, ?name[]= filters.
    _, status, headers, body = scrape(port, path="/metrics?name[]=idrep_ready",
                                      headers={"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text") and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body).decode().splitlines()[-2:] == ["idrep_ready 0.0", "# EOF"]


def test_close_returns_at_once_and_lets_every_client_go(server):
    metrics, port = server
    with connections(port, 100, SLOW_LORIS) as silent, connections(port, 4, b"G") as trickling:
        time.sleep(0.2)  # accepted
        started = time.monotonic()
        metrics.close()
        assert time.monotonic() - started < 0.5
        time.sleep(0.1)
        assert all(let_go(connection) for connection in silent + trickling)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_server_listens_on_ipv6_and_says_when_it_cannot_listen(server):
    _metrics, port = server
    with pytest.raises(OSError):
        DaemonMetrics("second").serve("127.0.0.1", port)  # in use: the daemon refuses to start, naming it
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    metrics = DaemonMetrics("ipv6")
    try:
        port6 = metrics.serve("::1", 0)
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1 here ({exc})")
    try:
        assert scrape(port6, host="::1")[1] == 200
    finally:
        metrics.close()


def test_trickling_and_silent_clients_neither_delay_scrapes_nor_hold_up_a_daemons_stop(lab):
    """One real daemon. Its port is jammed from the moment it listens (while it loads its models)
    by 40 silent clients and 4 that send a byte every 2 s, until they are dropped at the request
    deadline; every scrape until then, and one after, answers within 1 s. Then 150 silent
    and 4 trickling clients more, and SIGTERM: the daemon exits as fast as with no client (~0.1 s
    here), far sooner than any of their deadlines."""
    daemon = lab.start(wait=False)
    port = daemon.wait_for("metrics_listening", 60)["port"]
    with connections(port, 40, SLOW_LORIS) as silent, connections(port, 4, SLOW_LORIS[:1]) as trickling:
        started = time.monotonic()
        sent = 1
        dropped_after: dict[int, float] = {}  # trickling client -> seconds from its connect to its drop
        slowest = 0.0
        while len(dropped_after) < 4 and time.monotonic() - started < METRICS_REQUEST_SECONDS + 2.0:
            seconds, status, _, _ = scrape(port)
            assert status == 200
            slowest = max(slowest, seconds)
            now = time.monotonic() - started
            for index, connection in enumerate(trickling):
                if index not in dropped_after and let_go(connection):
                    dropped_after[index] = now
            if now >= sent * TRICKLE_SECONDS:
                for connection in trickling:
                    trickle(connection, SLOW_LORIS[sent:sent + 1])
                sent += 1
            time.sleep(0.25)
        seconds, status, _, _ = scrape(port)
        slowest = max(slowest, seconds)
        assert slowest < SCRAPE_SECONDS, f"a scrape took {slowest:.2f} s with 4 trickling and 40 silent clients connected"
        assert sorted(dropped_after) == [0, 1, 2, 3], f"trickling clients still connected after {now:.1f} s: the deadline did not hold"
        assert all(METRICS_REQUEST_SECONDS - 0.5 < after < METRICS_REQUEST_SECONDS + 1.5 for after in dropped_after.values()), dropped_after
        assert all(let_go(connection) for connection in silent)

    daemon.wait_started(60)
    with connections(port, 150, SLOW_LORIS), connections(port, 4, SLOW_LORIS[:1]) as trickling:
        seconds, status, _, _ = scrape(port)
        assert status == 200 and seconds < SCRAPE_SECONDS
        daemon.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        next_byte = signalled + TRICKLE_SECONDS
        while daemon.process.poll() is None and time.monotonic() - signalled < 10:
            if time.monotonic() >= next_byte:
                for connection in trickling:
                    trickle(connection, b"E")
                next_byte += TRICKLE_SECONDS
            time.sleep(0.02)
        took = time.monotonic() - signalled
        assert daemon.wait(10) == 0
    assert took < 2.0, f"SIGTERM took {took:.1f} s to stop the daemon with jamming clients connected\n{daemon.tail()}"
    daemon.wait_for("daemon_stopped", 5, exit_code=0)
