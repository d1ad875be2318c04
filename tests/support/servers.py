"""Servers on loopback for the remote-shard tests: started by fixtures, stopped by them (never left running).

* :class:`HttpServer`: Debian's nginx serving a directory (a private config, one process, a free port), or Python's
  ``http.server`` where nginx is missing (``DIT_REQUIRE_NGINX=1``, set by CI, makes a missing nginx an error;
  ``DIT_TEST_HTTP_SERVER=python`` uses http.server anyway).
* :class:`StallServer`: answers every ``.tar`` request with its headers and the first bytes of the file, then sends
  nothing more (a server that hangs mid-transfer); other files are served whole.
* :class:`MotoServer`: ``moto_server`` as an S3 endpoint (``AWS_ENDPOINT_URL``), filled with the usual client.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: Optional[subprocess.Popen], what: str, timeout: float = 60.0) -> None:
    """Return once 127.0.0.1:port accepts connections; fail the test (process killed) if it does not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    if proc is not None:
        proc.kill()
        proc.wait()
    pytest.fail(f"{what} did not listen on port {port} within {timeout:.0f} s")


def tool(name: str) -> Optional[str]:
    """An executable on PATH or beside this Python (a virtual environment that is not activated)."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server process (kill it after 10 s) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class HttpServer:
    """A directory served over HTTP on 127.0.0.1 (nginx if installed, else http.server); ``stop()`` and
    ``start()`` may be called any number of times (the port stays the same)."""

    def __init__(self, root: Path, scratch: Path):
        self.root, self.scratch = Path(root), Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        nginx = tool("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
        if os.environ.get("DIT_TEST_HTTP_SERVER") == "python":  # exercise the fallback where nginx is installed
            nginx = None
        if nginx is None and os.environ.get("DIT_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is not installed and DIT_REQUIRE_NGINX=1 (run .ci/install_nginx.sh as root)")
        self.nginx = nginx
        self.kind = "nginx" if nginx else "python"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> List[str]:
        if self.nginx is None:
            return [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory",
                    str(self.root)]
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        conf = self.scratch / "nginx.conf"
        conf.write_text(f"""daemon off; master_process off; {user}
pid {self.scratch}/nginx.pid; error_log {self.scratch}/error.log warn;
events {{ worker_connections 256; }}
http {{ access_log off; sendfile on; client_body_temp_path {self.scratch}/body;
  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }} }}
""")
        return [self.nginx, "-p", str(self.scratch), "-c", str(conf), "-e", str(self.scratch / "error.log")]

    def start(self) -> "HttpServer":
        """Start serving (and wait until it listens)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         stdin=subprocess.DEVNULL)
            wait_for_port(self.port, self.proc, self.kind)
        return self

    def stop(self) -> None:
        """Stop serving: from now on connections are refused."""
        if self.proc is not None:
            stop_process(self.proc)


class _StallHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: "StallServer" = self.server.owner  # type: ignore[attr-defined]
        request = self.rfile.readline().decode("latin1").split()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        path = server.root / request[1].lstrip("/").split("?")[0] if len(request) > 1 else server.root
        if not path.is_file():
            self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        data = path.read_bytes()
        self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        if path.suffix != ".tar":
            self.wfile.write(data)
            return
        self.wfile.write(data[:server.send])
        self.wfile.flush()
        server.stalled += 1
        server.release.wait(timeout=120)  # hold the connection open, sending nothing


class StallServer:
    """Serves ``root``; ``.tar`` files stall after their first ``send`` bytes until :meth:`stop`."""

    def __init__(self, root: Path, send: int = 2048):
        self.root, self.send = Path(root), send
        self.release = threading.Event()
        self.stalled = 0
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _StallHandler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Release the stalled connections and stop serving."""
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class MotoServer:
    """``moto_server`` on a free loopback port, with the environment the AWS tools need to use it (fake
    credentials, ``AWS_ENDPOINT_URL``, no user config files)."""

    def __init__(self, scratch: Path):
        moto, aws = tool("moto_server"), tool("aws")
        if moto is None or aws is None:
            missing = " and ".join(n for n, t in (("moto_server", moto), ("aws", aws)) if t is None)
            if os.environ.get("DIT_REQUIRE_REMOTE_TOOLS") == "1":
                pytest.fail(f"{missing} not found and DIT_REQUIRE_REMOTE_TOOLS=1 (pip install -e '.[dev]')")
            pytest.skip(f"{missing} not found (pip install -e '.[dev]' installs moto[server] and awscli)")
        self.aws = aws
        self.port = free_port()
        self.env: Dict[str, str] = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(scratch / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-creds"),
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        self.proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, "moto_server")

    def aws_cli(self, *args: str) -> None:
        """Run ``aws ARGS...`` against the server (the usual client); fail the test if it fails."""
        proc = subprocess.run([self.aws, *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"aws {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}")

    def stop(self) -> None:
        """Stop the server."""
        stop_process(self.proc)
