"""A real S3 API for the archive tests: moto's server mode behind nginx terminating TLS with a throwaway CA.

pgBackRest speaks HTTPS only and checks the server's certificate against the endpoint's DNS name, so the endpoint
is a name, `s3.prayer-room.test`, which a container resolves to the machine running the tests (its link's gateway,
10.231.N.1) through the /etc/hosts lines `hosts_lines` gives (BUCKET.s3.prayer-room.test too, for host-style
requests). nginx listens on every IPv4 address of the machine on a free port and passes each request to moto on
loopback over plain HTTP: moto's own --ssl ends connections without a TLS close_notify, which pgBackRest refuses
("unexpected eof while reading").

moto takes the first label of a host name for the bucket (host style) unless the host is one of its custom
endpoints: the endpoint's own name is one, so path-style requests to it and host-style requests to
BUCKET.s3.prayer-room.test both work. moto keeps the objects in memory; `objects` reads them back to check what
the bucket holds. Each test uses a prefix of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.ca import make_listener_certificate, stop_processes, wait_port
from tests.support.services import free_port

if TYPE_CHECKING:
    from tests.support.nspawn import Container

NAME = "s3.prayer-room.test"
BUCKET = "prayer-room-archive"
REGION = "us-east-1"
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def missing_tools() -> str | None:
    """Why the S3 server cannot start here, or None."""
    missing = [tool for tool in ("nginx", "openssl") if not shutil.which(tool)]
    if not MOTO_SERVER.exists():
        missing.append(f"{MOTO_SERVER} (moto[server], the dev extra)")
    return f"missing {', '.join(missing)} (.ci/setup.d/20-deploy.sh, 26-tls.sh)" if missing else None


class S3Server:
    """moto behind an nginx TLS front; `ca` is the PEM file a client must trust to reach it."""

    key = "prayer-room-test-key"
    key_secret = "prayer-room-test-secret"
    region = REGION
    bucket = BUCKET
    name = NAME

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.moto_port = free_port()
        self._procs: list[subprocess.Popen] = []

    @property
    def endpoint(self) -> str:
        """The endpoint a server's pgBackRest is given (host name; the port is `port`)."""
        return self.name

    @property
    def url(self) -> str:
        return f"https://{self.name}:{self.port}"

    def hosts_lines(self, address: str) -> str:
        """/etc/hosts lines that resolve the endpoint (path style) and the bucket's name under it (host style)."""
        return f"{address}\t{self.name} {self.bucket}.{self.name}\n"

    def start(self) -> S3Server:
        self.ca, cert, key = make_listener_certificate(
            self.workdir / "tls", ["127.0.0.1"], [self.name, f"*.{self.name}"], ca_name="prayer-room test S3 CA"
        )
        env = {
            **os.environ,
            # Path style for the endpoint's own name (any other dotted name is BUCKET.endpoint).
            "MOTO_S3_CUSTOM_ENDPOINTS": f"{self.url},https://127.0.0.1:{self.port}",
        }
        self._spawn([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.moto_port)], "moto.log", env)
        wait_port("127.0.0.1", self.moto_port)
        front = self.workdir / "nginx"
        front.mkdir()
        (front / "nginx.conf").write_text(
            textwrap.dedent("""\
                worker_processes 1;
                pid {d}/nginx.pid;
                error_log {d}/error.log;
                events {{ worker_connections 256; }}
                http {{
                    access_log {d}/access.log;
                    client_body_temp_path {d}/body;
                    proxy_temp_path {d}/proxy;
                    fastcgi_temp_path {d}/fastcgi;
                    uwsgi_temp_path {d}/uwsgi;
                    scgi_temp_path {d}/scgi;
                    server {{
                        listen {port} ssl;
                        ssl_certificate {cert};
                        ssl_certificate_key {key};
                        client_max_body_size 0;
                        proxy_request_buffering off;
                        proxy_buffering off;
                        proxy_http_version 1.1;
                        location / {{
                            proxy_pass http://127.0.0.1:{moto_port};
                            proxy_set_header Host $http_host;
                        }}
                    }}
                }}
            """).format(d=front, port=self.port, cert=cert, key=key, moto_port=self.moto_port)
        )
        self._spawn(["nginx", "-p", str(front), "-c", str(front / "nginx.conf"), "-g", "daemon off;"], "nginx.out")
        wait_port("127.0.0.1", self.port)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _spawn(self, argv: list[str], log: str, env: dict | None = None) -> None:
        out = (self.workdir / log).open("wb")
        self._procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))

    def client(self):
        """A boto3 S3 client that reaches the bucket through the TLS front, trusting the throwaway CA alone."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=f"https://127.0.0.1:{self.port}",
            region_name=self.region,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.key_secret,
            verify=str(self.ca),
            config=Config(s3={"addressing_style": "path"}),
        )

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix` in the bucket, key -> content."""
        client = self.client()
        contents: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                contents[item["Key"]] = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        return contents

    def log(self) -> str:
        return "".join((self.workdir / name).read_text(errors="replace")[-2000:] for name in ("moto.log", "nginx.out"))

    def stop(self) -> None:
        stop_processes(self._procs)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3 server (started on first use); tests keep to a prefix of their own in its bucket."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


def boot_server(directory: Path, server: S3Server) -> Container:
    """A fresh Debian 13 test server, booted, that resolves the S3 endpoint to this machine."""
    from tests.support.nspawn import Container, build_rootfs

    container = Container(directory).create(build_rootfs())
    (container.rootfs / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tvps\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        + server.hosts_lines(container.gateway)
    )
    container.boot()
    return container
