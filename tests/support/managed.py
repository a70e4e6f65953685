"""A "managed" PostgreSQL and Redis for a cluster without a db host, as a provider offers them: on this machine,
listening on an address the containers reach (a container's gateway, 10.231.N.1) besides 127.0.0.1, TLS only with a
certificate of the provider's own CA naming that address, password logins. The operator puts the URLs (and the CA
file they name) on the cluster; the tests read what landed through the admin side (127.0.0.1).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
from pathlib import Path

import psycopg
import redis

from tests.support.ca import make_listener_certificate
from tests.support.services import PostgresServer, RedisServer, _wait, scratch_dir

DATABASE = "prayer_room"
ROLE = "prayer_room"


class ManagedRedis(RedisServer):
    """Debian's redis-server (built with TLS) on `address` and 127.0.0.1, TLS only (`port 0`), a password."""

    name = "redis"

    def __init__(self, directory: Path, address: str, certificate: tuple[Path, Path, Path], password: str):
        super().__init__(directory)
        self.address = address
        self.ca, self.cert, self.key = certificate
        self.password = password

    def start(self, timeout: float = 30) -> ManagedRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._spawn(
            [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", self.address]
            + ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca)]
            + ["--tls-auth-clients", "no", "--requirepass", self.password, "--dir", str(self.directory)]
            + ["--daemonize", "no", "--save", "", "--appendonly", "no"]
        )
        _wait(self._answers, timeout, "redis-server (TLS)", self.process, self.log_path)
        return self

    def client(self, db: int = 0) -> redis.Redis:
        """An admin client over TLS on 127.0.0.1 (the certificate checked against the CA, not the name)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=self.password, ssl=True, ssl_ca_certs=str(self.ca),
            ssl_check_hostname=False, socket_connect_timeout=2, socket_timeout=5,
        )  # fmt: skip

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False


class ManagedServices:
    """PostgreSQL (database and role `prayer_room`, `hostssl` + scram-sha-256 from `client` alone) and Redis, each
    TLS only on `address`, with one test CA. `url(...)` gives what the operator puts in the env file."""

    def __init__(self, workdir: Path, address: str, client: str):
        self.workdir = Path(workdir)
        self.address = address
        self.client = client
        self.db_password = secrets.token_urlsafe(24)
        self.redis_password = secrets.token_urlsafe(32)
        self.ca, cert, key = make_listener_certificate(
            self.workdir / "ca", addresses=(address, "127.0.0.1"), ca_name="managed services test CA"
        )
        self.postgres = PostgresServer(scratch_dir("prayer-room-managed-pg-") / "pg")
        self.redis = ManagedRedis(self.workdir / "redis", address, (self.ca, cert, key), self.redis_password)
        self._cert, self._key = cert, key

    def start(self) -> ManagedServices:
        self.redis.start()
        postgres = self.postgres
        postgres._initdb(postgres._bin_dir())
        for name, source in (("server.crt", self._cert), ("server.key", self._key)):
            shutil.copy(source, postgres.data / name)
            os.chmod(postgres.data / name, 0o600)
            if postgres.user:
                entry = pwd.getpwnam(postgres.user)
                os.chown(postgres.data / name, entry.pw_uid, entry.pw_gid)
        (postgres.data / "pg_hba.conf").write_text(
            f"host all postgres 127.0.0.1/32 trust\nhostssl {DATABASE} {ROLE} {self.client}/32 scram-sha-256\n"
        )
        postgres.listen = f"127.0.0.1,{self.address}"
        postgres.settings = {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}
        postgres.start()
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.db_password}'")
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        return self

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop()
        shutil.rmtree(self.postgres.directory.parent, ignore_errors=True)

    def database_url(self, ca_file: str) -> str:
        """DATABASE_URL for the app: TLS checked against the CA at `ca_file` (on the app hosts) and the address."""
        return (
            f"postgres://{ROLE}:{self.db_password}@{self.address}:{self.postgres.port}/{DATABASE}"
            f"?sslmode=verify-full&sslrootcert={ca_file}"
        )

    def redis_url(self, db: int, ca_file: str) -> str:
        """A rediss:// URL for the app: the certificate and the host name checked, both said in the URL."""
        return (
            f"rediss://:{self.redis_password}@{self.address}:{self.redis.port}/{db}"
            f"?ssl_cert_reqs=required&ssl_check_hostname=true&ssl_ca_certs={ca_file}"
        )

    def sql(self, query: str, database: str = DATABASE) -> list[tuple]:
        """Rows of `query` as the admin, on 127.0.0.1."""
        url = self.postgres.url.rsplit("/", 1)[0] + f"/{database}"
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(query).fetchall()
