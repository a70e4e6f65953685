"""The cluster CA's command lines (openssl, on the servers): create the CA on the db host, make a key and a
signing request on a host, sign it on the db host with the names the operator's side chose, check a certificate."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy.commands import sh

# P-256 keys: what PostgreSQL, Redis, nginx and every client here take, and quick to make.
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def create_ca(directory: PurePosixPath, common_name: str, days: int) -> str:
    """Create the CA in `directory` (root-only) unless its key and certificate are there; prints "created" when it
    made them. The key is written under umask 077 and never printed."""
    key, cert = directory / "ca.key", directory / "ca.crt"
    make = sh(
        "openssl", "req", "-x509", *_NEW_KEY, "-keyout", f"{key}.new", "-out", f"{cert}.new", "-days", days,
        "-subj", f"/CN={common_name}", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return (
        f"install -d -o root -g root -m 0700 {sh(directory)} && "
        f"if test -s {sh(key)} && test -s {sh(cert)}; then :; else "
        f"(umask 077 && {make} 2>/dev/null && mv {sh(f'{key}.new')} {sh(key)} && mv {sh(f'{cert}.new')} {sh(cert)}"
        " && echo created); fi"
    )


def signing_request(key: PurePosixPath, common_name: str) -> str:
    """A new private key at KEY.new (root's, 0600) and its signing request on stdout."""
    return (
        f"install -d -o root -g root -m 0755 {sh(key.parent)} && (umask 077 && "
        + sh("openssl", "req", "-new", *_NEW_KEY, "-keyout", f"{key}.new", "-subj", f"/CN={common_name}")
        + " 2>/dev/null)"
    )


def sign(directory: PurePosixPath, request: str, extensions: str, serial: int, days: int) -> str:
    """Sign `request` (PEM) with the CA in `directory`, with `extensions` (the names; the request's own are
    ignored); the certificate on stdout."""
    openssl = sh(
        "openssl", "x509", "-req", "-CA", directory / "ca.crt", "-CAkey", directory / "ca.key",
        "-set_serial", hex(serial), "-days", days, "-sha256",
    )  # fmt: skip
    return (
        f"d=$(mktemp -d) && printf '%s\\n' {sh(request.strip())} > \"$d/csr\""
        f" && printf '%s' {sh(extensions)} > \"$d/ext\""
        f' && {openssl} -in "$d/csr" -extfile "$d/ext" 2>"$d/err"; code=$?; [ $code = 0 ] || cat "$d/err" >&2;'
        ' rm -rf "$d"; exit $code'
    )


def certificate_fits(cert: PurePosixPath, key: PurePosixPath, ca: PurePosixPath, address: str, days: int) -> str:
    """Exit 0 when `cert` is signed by `ca`, names `address`, is valid for `days` more days and belongs to `key`."""
    check = "-checkip" if ":" in address or address.replace(".", "").isdigit() else "-checkhost"
    return (
        f"test -s {sh(cert)} && test -s {sh(key)} && "
        + sh("openssl", "verify", "-CAfile", ca, cert)
        + " >/dev/null 2>&1 && "
        + sh("openssl", "x509", "-in", cert, "-noout", "-checkend", days * 86400)
        + " >/dev/null && "
        + sh("openssl", "x509", "-in", cert, "-noout", check, address)
        + " | grep -q ' does match' && "
        + f'[ "$(openssl x509 -in {sh(cert)} -noout -pubkey)" = "$(openssl pkey -in {sh(key)} -pubout)" ]'
    )
