"""The command lines and parsers of `fab os-update --release` (deploy/release_upgrade.py): what it reads on the server,
apt's sources moved to the next Debian release, the download and the upgrade, PostgreSQL's clusters and the rows in
them. Pure: text in, text out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from deploy.commands import sh
from deploy.commands.updates import APT, apt_update

# The release a server is upgraded to from each one the kit upgrades (codename -> (codename, version)).
NEXT_RELEASE = {"bookworm": ("trixie", "13")}
VERSIONS = {"bookworm": "12", "trixie": "13"}
# Where the sources files as they were are kept (root-only): the way back before any package changed.
SOURCES_KEPT = PurePosixPath("/var/backups/prayer-room-apt-sources")
APT_SOURCES = (PurePosixPath("/etc/apt/sources.list"), PurePosixPath("/etc/apt/sources.list.d"))

# The kit's config files stay as they are (a package's new default beside them as .dpkg-dist); a file nobody
# changed takes the package's new version (confdef); ucf-managed files the same way; no new Recommends pulled in.
UPGRADE_ENV = "APT_LISTCHANGES_FRONTEND=none UCF_FORCE_CONFFOLD=1"
UPGRADE_OPTIONS = (
    "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o APT::Install-Recommends=false"
)

# What the command decides on, read in one round trip: the release, the Python, the sources, the clusters, the space.
FACTS = """\
. /etc/os-release
echo "codename=$VERSION_CODENAME"
echo "version=$VERSION_ID"
echo "python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
echo "free_kb=$(df -Pk /var | awk 'NR==2 {print $4}')"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && echo "source=$f"
done
pg_lsclusters --no-header 2>/dev/null | sed 's/^/cluster=/'
"""


@dataclass(frozen=True)
class Cluster:
    """One line of pg_lsclusters."""

    version: str
    name: str
    port: int
    status: str

    @property
    def label(self) -> str:
        return f"{self.version}/{self.name}"


@dataclass(frozen=True)
class Facts:
    codename: str
    version: str
    python: str
    free_kb: int
    sources: tuple[str, ...]
    clusters: tuple[Cluster, ...]


def parse_facts(text: str) -> Facts:
    values: dict[str, str] = {}
    sources, clusters = [], []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "source":
            sources.append(value)
        elif key == "cluster":
            words = value.split()
            if len(words) >= 4 and words[2].isdigit():
                clusters.append(Cluster(words[0], words[1], int(words[2]), words[3]))
        elif key:
            values[key] = value.strip()
    free = values.get("free_kb", "")
    return Facts(
        codename=values.get("codename", ""),
        version=values.get("version", ""),
        python=values.get("python", ""),
        free_kb=int(free) if free.isdigit() else 0,
        sources=tuple(sources),
        clusters=tuple(clusters),
    )


def _suite(word: str, old: str, new: str) -> str:
    """`old` or `old-SOMETHING` (updates, security, backports) as the same suite of `new`; any other word as it is."""
    match = re.fullmatch(rf"{re.escape(old)}(-[a-z-]+)?", word)
    return f"{new}{match.group(1) or ''}" if match else word


def switch_sources(text: str, old: str, new: str) -> str:
    """An apt sources file with every suite of release `old` named as release `new`'s: the `Suites:` fields of a
    deb822 file, the suite word of a one-line `deb`/`deb-src` entry. The mirrors, components, options and comments stay
    as they are."""
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        ending = line[len(body) :]
        field = re.match(r"(?i)(suites:)(\s*)(.*)$", body)
        if field:
            words = re.split(r"(\s+)", field.group(3))
            body = field.group(1) + field.group(2) + "".join(_suite(word, old, new) for word in words)
        elif re.match(r"\s*deb(-src)?\s", body):
            words = re.split(r"(\s+)", body)
            # deb [options] URI SUITE COMPONENT...: the suite is the second word after the options.
            spots = [i for i, word in enumerate(words) if word.strip()][1:]
            if spots and words[spots[0]].startswith("["):
                end = next((n for n, i in enumerate(spots) if words[i].endswith("]")), len(spots))
                spots = spots[end + 1 :]
            if len(spots) >= 2 and not words[spots[1]].startswith("#"):
                words[spots[1]] = _suite(words[spots[1]], old, new)
            body = "".join(words)
        out.append(body + ending)
    return "".join(out)


def repositories(text: str) -> list[tuple[str, str]]:
    """The (URI, suite) pairs an apt sources file names, deb822 or one-line, enabled ones only."""
    pairs: list[tuple[str, str]] = []
    if re.search(r"(?im)^\s*(types|uris|suites):", text):
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                if sep and not key.startswith((" ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            pairs += [
                (uri, suite) for uri in fields.get("uris", "").split() for suite in fields.get("suites", "").split()
            ]
        return pairs
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if words[:1] in (["deb"], ["deb-src"]) and len(words) >= 3:
            pairs.append((words[1], words[2]))
    return pairs


# Each line of stdin a URL; prints "STATUS URL" (0 when nothing answered) for each: whether the mirror has the suite.
PROBE = r"""python3 -c '
import sys, urllib.request, urllib.error
for url in sys.stdin.read().split():
    status = 0
    for name in ("InRelease", "Release"):
        try:
            with urllib.request.urlopen(urllib.request.Request(url + name, method="HEAD"), timeout=20) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0
        if status == 200:
            break
    print(status, url)
'"""


def probe_urls(pairs: list[tuple[str, str]]) -> list[str]:
    """The dists/SUITE/ directory of each (URI, suite) reachable over HTTP(S) (file:, cdrom: and the like skipped)."""
    urls = [f"{uri.rstrip('/')}/dists/{suite}/" for uri, suite in pairs if uri.startswith(("http://", "https://"))]
    return list(dict.fromkeys(urls))


def keep_sources(files: list[str]) -> str:
    """As root: a copy of each sources file as it is, under SOURCES_KEPT at its own path (an earlier attempt's
    copies replaced)."""
    steps = [sh("rm", "-rf", SOURCES_KEPT), sh("install", "-d", "-m", "700", SOURCES_KEPT)]
    for path in files:
        kept = PurePosixPath(f"{SOURCES_KEPT}{path}")
        steps += [sh("mkdir", "-p", kept.parent), sh("cp", "-a", path, kept)]
    return " && ".join(steps)


def put_sources_back(files: list[str]) -> str:
    """As root: the kept copies back in place, and apt's lists fetched for them again."""
    copies = " && ".join(sh("cp", "-a", f"{SOURCES_KEPT}{path}", path) for path in files)
    return f"{copies} && {apt_update()}"


def download() -> str:
    """The new release's package lists, then every package its upgrade needs downloaded (nothing installed yet)."""
    return f"{apt_update()} && {UPGRADE_ENV} {APT} {UPGRADE_OPTIONS} --download-only full-upgrade"


def full_upgrade() -> str:
    """Every package upgraded to the new release, without a question, keeping the kit's config files."""
    return f"{UPGRADE_ENV} {APT} {UPGRADE_OPTIONS} full-upgrade"


def parse_upgrade_counts(text: str) -> tuple[int, int, int]:
    """apt-get's `N upgraded, M newly installed, R to remove` line (zeros when absent)."""
    found = re.search(r"^(\d+) upgraded, (\d+) newly installed, (\d+) to remove", text, re.M)
    return tuple(int(n) for n in found.groups()) if found else (0, 0, 0)  # type: ignore[return-value]


def removed_packages(text: str) -> list[str]:
    """The packages apt-get's output says it removes (`The following packages will be REMOVED:` and its indented
    lines; `name*` is a purge)."""
    found = re.search(r"^The following packages will be REMOVED:\n((?:  .*\n?)+)", text, re.M)
    return [name.rstrip("*") for name in found.group(1).split()] if found else []


def row_counts(cluster: Cluster, database: str) -> str:
    """As root: `table count` for every table of `database` in `cluster`, by name (as PostgreSQL's superuser)."""
    sql = (
        "SELECT format('%s.%s', table_schema, table_name), (xpath('/row/c/text()', query_to_xml(format("
        "'SELECT count(*) AS c FROM %I.%I', table_schema, table_name), false, true, '')))[1]::text "
        "FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
        "AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
    )
    psql = sh("runuser", "-u", "postgres", "--", "psql", "--cluster", cluster.label, "-X", "-q", "-tA", "-F", " ",
              "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql)  # fmt: skip
    return f"cd / && {psql}"


def parse_row_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        name, _, count = line.rpartition(" ")
        if name and count.isdigit():
            counts[name] = int(count)
    return counts


def databases(cluster: Cluster) -> str:
    """As root: the names of the databases in `cluster`."""
    psql = sh("runuser", "-u", "postgres", "--", "psql", "--cluster", cluster.label, "-X", "-q", "-tA", "-d",
              "postgres", "-c", "SELECT datname FROM pg_database ORDER BY 1")  # fmt: skip
    return f"cd / && {psql}"


EMPTY_CLUSTER_DATABASES = {"postgres", "template0", "template1"}


def access_settings(old: Cluster, new: Cluster) -> str:
    """As root: `old RULE` / `new RULE` for each rule of each cluster's pg_hba.conf (comments and blank lines out,
    spaces collapsed), and `old conf.d/NAME` / `new conf.d/NAME` for each file of its conf.d with its sha256."""
    lines = []
    for side, cluster in (("old", old), ("new", new)):
        etc = PurePosixPath("/etc/postgresql") / cluster.version / cluster.name
        lines.append(
            f"sed -e 's/#.*//' -e 's/[[:space:]]\\+/ /g' -e 's/^ //' -e 's/ $//' {sh(etc / 'pg_hba.conf')}"
            f" | grep -v '^$' | sed 's/^/{side} /'"
        )
        lines.append(
            f"(cd {sh(etc / 'conf.d')} 2>/dev/null && sha256sum -- * 2>/dev/null) | "
            f'awk \'{{print "{side} conf.d/" $2 " " $1}}\''
        )
    return "; ".join(lines) + "; true"


def parse_lost_settings(text: str) -> list[str]:
    """What the old cluster's pg_hba.conf and conf.d had that the new one's lack (pg_upgradecluster copies both)."""
    sides: dict[str, set[str]] = {"old": set(), "new": set()}
    for line in text.splitlines():
        side, _, rest = line.partition(" ")
        if side in sides and rest:
            sides[side].add(rest)
    return sorted(sides["old"] - sides["new"])


def drop_cluster(cluster: Cluster) -> str:
    return sh("pg_dropcluster", "--stop", cluster.version, cluster.name)


def upgrade_cluster(cluster: Cluster, version: str) -> str:
    """pg_upgradecluster: the cluster copied into a new one of `version` (dump and restore, the old one left as it
    was, on another port, not started at boot); the new one takes the old one's port and settings (pg_hba.conf,
    postgresql.conf, conf.d)."""
    return f"cd / && {sh('pg_upgradecluster', '-v', version, '-m', 'dump', cluster.version, cluster.name)}"


def remove_packages(packages: list[str]) -> str:
    return f"{APT} purge {sh(*packages)}"


def counts_json(counts: dict[str, int]) -> str:
    return json.dumps(counts, sort_keys=True)
