"""OS updates without a server: unattended-upgrades' file from the release's facts, `fab status`'s line on pending
updates and reboots, and the order `fab os-update` takes the hosts in."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.commands import updates as updates_commands
from deploy.config import DeployConfig, load_config, single_host_site
from deploy.errors import DeployError
from deploy.os_update import update_order
from deploy.render.updates import fallback_origin, render_unattended_upgrades, security_origins
from deploy.updates import parse_pending, pending_line

REPO = Path(__file__).resolve().parents[2]

POLICY_12 = """\
codename=bookworm
release a=now
release v=12,o=Debian,a=oldstable-security,n=bookworm-security,l=Debian-Security,c=main,b=amd64
release v=12-updates,o=Debian,a=oldstable-updates,n=bookworm-updates,l=Debian,c=main,b=amd64
release v=12.15,o=Debian,a=oldstable,n=bookworm,l=Debian,c=main,b=amd64
release v=12,o=Debian,a=oldstable-security,n=bookworm-security,l=Debian-Security,c=main,b=all
release o=packages.example.org,n=bookworm-security,l=Other,c=main
"""


def test_the_pattern_is_the_release_security_suite_apt_knows_and_nothing_else():
    assert security_origins(POLICY_12, "bookworm") == ["origin=Debian,codename=bookworm-security,label=Debian-Security"]
    assert security_origins(POLICY_12, "trixie") == []  # another release's suite is not this one's
    assert security_origins("release a=now\n", "trixie") == []
    assert fallback_origin("trixie") == "origin=Debian,codename=trixie-security,label=Debian-Security"


def test_the_file_clears_debians_default_origins_and_never_reboots():
    text = render_unattended_upgrades(["origin=Debian,codename=trixie-security,label=Debian-Security"])
    lines = text.splitlines()
    # The #clear comes before our list: Debian's 50unattended-upgrades (read first) also allows the point release.
    assert lines.index("#clear Unattended-Upgrade::Origins-Pattern;") < lines.index(
        "Unattended-Upgrade::Origins-Pattern {"
    )
    assert '    "origin=Debian,codename=trixie-security,label=Debian-Security";' in lines
    assert 'APT::Periodic::Unattended-Upgrade "1";' in lines
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in lines
    # Debian's apt writes no stamp of a successful update (Ubuntu's update-notifier-common adds this one).
    assert (
        'APT::Update::Post-Invoke-Success {"touch /var/lib/apt/periodic/update-success-stamp 2>/dev/null || true";};'
    ) in lines


@pytest.mark.skipif(not Path("/usr/bin/apt-config").exists(), reason="apt-config is Debian's")
def test_apt_reads_only_the_security_pattern_after_debians_own_file(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "50unattended-upgrades").write_text(
        'Unattended-Upgrade::Origins-Pattern {\n "origin=Debian,codename=${distro_codename},label=Debian";\n};\n'
    )
    wanted = "origin=Debian,codename=trixie-security,label=Debian-Security"
    (parts / "52prayer-room-unattended-upgrades").write_text(render_unattended_upgrades([wanted]))
    (tmp_path / "apt.conf").write_text(f'Dir::Etc::Parts "{parts}/";\n')
    dump = subprocess.run(
        ["apt-config", "dump"], env={"APT_CONFIG": str(tmp_path / "apt.conf")}, capture_output=True, text=True
    ).stdout
    patterns = [line for line in dump.splitlines() if line.startswith("Unattended-Upgrade::Origins-Pattern::")]
    assert patterns == [f'Unattended-Upgrade::Origins-Pattern:: "{wanted}";'], dump


PENDING = """\
now=1764928800
inst base-files [12.4+deb12u11] (12.4+deb12u15 Debian:12.15/oldstable [amd64])
inst libgcrypt20 [1.10.1-3] (1.10.1-3+deb12u1 Debian:12.15/oldstable, Debian-Security:12/oldstable-security [amd64])
inst libssl3 [3.0.15-1] (3.0.17-1~deb12u2 Debian-Security:12/oldstable-security [amd64])
lists=1764918000
unattended=1764900000
"""


def test_status_reads_the_newest_of_what_apt_update_and_unattended_upgrade_leave(tmp_path):
    """The shell lines of commands.PENDING, run on files with known times: the newest one's time, nothing for none."""
    periodic, lists = tmp_path / "periodic", tmp_path / "lists"
    periodic.mkdir()
    lists.mkdir()
    for path, when in (
        (lists / "deb.debian.org_debian_dists_trixie_InRelease", 1764800000),  # unchanged at the last fetch
        (lists / "deb.debian.org_debian-security_dists_trixie-security_InRelease", 1764918000),  # fetched anew
        (periodic / "update-stamp", 1764850000),  # the daily timer's last update
        (periodic / "upgrade-stamp", 1764900000),  # the daily timer's last unattended-upgrade
    ):
        path.touch()
        os.utime(path, (when, when))
    fetched = (f"{periodic}/update-success-stamp", f"{periodic}/update-stamp", f"{lists}/*_InRelease",
               f"{lists}/*_Release")  # fmt: skip
    line = updates_commands.newest_mtime("lists", fetched)
    ran = updates_commands.newest_mtime(
        "unattended", (f"{periodic}/unattended-upgrades-stamp", f"{periodic}/upgrade-stamp")
    )
    out = subprocess.run(["sh", "-c", f"{line}\n{ran}\n"], capture_output=True, text=True).stdout
    assert out == "lists=1764918000\nunattended=1764900000\n"
    (periodic / "update-success-stamp").touch()  # provision's hook, after a successful update just now
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True).stdout
    assert abs(int(out.removeprefix("lists=")) - time.time()) < 60
    nothing = updates_commands.newest_mtime("lists", (f"{tmp_path}/none-stamp", f"{tmp_path}/none/*_InRelease"))
    assert subprocess.run(["sh", "-c", nothing], capture_output=True, text=True).stdout == ""
    # The real command names these very paths.
    assert all(
        path in updates_commands.PENDING for path in updates_commands.LISTS_FETCHED + updates_commands.UNATTENDED_RAN
    )


def test_status_counts_pending_and_security_updates_and_warns_of_a_pending_reboot():
    pending = parse_pending(PENDING)
    assert pending.upgrades == ("base-files", "libgcrypt20", "libssl3")
    assert pending.security == ("libgcrypt20", "libssl3")
    line = pending_line(pending)
    assert line == ("updates: 3 pending (2 security); package lists fetched 3 h ago, unattended-upgrade ran 8 h ago"), (
        line
    )
    rebooting = parse_pending(PENDING + "reboot=1764756000\nreboot_packages=libc6 linux-image-amd64 \n")
    assert pending_line(rebooting).endswith(
        "  WARNING: a reboot is pending since 2 days ago by libc6, linux-image-amd64: `fab os-update` reboots it"
    )
    fresh = pending_line(parse_pending("now=1764928800\n"))
    assert fresh == "updates: none pending; package lists fetched never, unattended-upgrade ran never"


def test_os_update_takes_web_hosts_first_then_the_other_app_hosts_the_balancer_and_the_db_host_last(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(
        "[environments.cluster.roles]\n"
        'web = ["root@10.0.0.2", "root@10.0.0.3"]\nworker = ["root@10.0.0.6", "root@10.0.0.4"]\n'
        'beat = ["root@10.0.0.4", "root@10.0.0.2"]\ndb = ["root@10.0.0.4"]\nbalancer = ["root@10.0.0.5"]\n'
    )
    config = load_config(path, "cluster")
    hosts = config.site_hosts
    order = ["root@10.0.0.2", "root@10.0.0.3", "root@10.0.0.6", "root@10.0.0.5", "root@10.0.0.4"]
    assert update_order(config, hosts) == order
    assert update_order(config, ["root@10.0.0.4", "root@10.0.0.3"]) == ["root@10.0.0.3", "root@10.0.0.4"]  # -H
    one = single_host_site(DeployConfig(), "root@203.0.113.7")
    assert update_order(one, one.site_hosts) == ["root@203.0.113.7"]  # a site of one: the same path


def test_a_boot_timeout_that_is_no_number_is_one_line_and_touches_nothing():
    fab = Path(sys.executable).with_name("fab")
    result = subprocess.run(
        [str(fab), "-H", "root@203.0.113.7", "os-update", "--boot-timeout", "soon"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert (result.stdout + result.stderr).strip() == "error: --boot-timeout must be a number of seconds, got 'soon'."


def test_the_lock_heartbeat_leaves_a_rebooting_hosts_lock_alone_and_takes_it_up_again():
    from types import SimpleNamespace

    from deploy.site import LockKeeper, Site

    class Lock:
        def __init__(self, name: str) -> None:
            self.server, self.refreshed = SimpleNamespace(name=name), threading.Event()

        def refresh(self) -> None:
            if self.server.name == "down":
                raise DeployError("no answer")  # what refreshing a host that reboots would raise
            self.refreshed.set()

    up, down = Lock("up"), Lock("down")
    site = Site(single_host_site(DeployConfig(), "root@203.0.113.7"), [])
    site.keeper = keeper = LockKeeper([down, up], interval=0.01)
    with site.offline(down.server), keeper:  # offline before the heartbeat's first beat
        assert up.refreshed.wait(5)  # the others' locks are refreshed meanwhile
        up.refreshed.clear()
        assert up.refreshed.wait(5)
        keeper.check()
    assert keeper.offline == set()
    with LockKeeper([down, up], interval=0.01) as keeper:  # positive control: without offline() it fails
        deadline = time.monotonic() + 5
        while keeper.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
    with pytest.raises(DeployError, match="no answer"):
        keeper.check()


# --- `fab os-update --release`: what it reads and refuses, the sources it writes (deploy/commands/release_upgrade.py)

DEB822_12 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian
Suites: bookworm bookworm-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
Enabled: yes
"""

ONE_LINE_12 = """\
deb http://deb.debian.org/debian bookworm main # keep bookworm in this comment
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://security.debian.org/debian-security bookworm-security main
# deb http://deb.debian.org/debian bookworm-backports main
deb-src http://deb.debian.org/debian bookworm-updates main
deb https://packages.example.org/apt cloud-sdk-bookworm main
"""


def test_the_sources_keep_their_mirrors_and_name_the_new_release_suites():
    from deploy.commands.release_upgrade import repositories, switch_sources

    new = switch_sources(DEB822_12, "bookworm", "trixie")
    assert new == DEB822_12.replace("Suites: bookworm bookworm-updates", "Suites: trixie trixie-updates").replace(
        "Suites: bookworm-security", "Suites: trixie-security"
    )
    assert repositories(new) == [
        ("http://mirror.example.org/debian", "trixie"),
        ("http://mirror.example.org/debian", "trixie-updates"),
        ("http://mirror.example.org/debian-security", "trixie-security"),
    ]
    lines = switch_sources(ONE_LINE_12, "bookworm", "trixie").splitlines()
    assert lines == [
        "deb http://deb.debian.org/debian trixie main # keep bookworm in this comment",
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://security.debian.org/debian-security "
        "trixie-security main",
        "# deb http://deb.debian.org/debian bookworm-backports main",  # a comment is left as it is
        "deb-src http://deb.debian.org/debian trixie-updates main",
        "deb https://packages.example.org/apt cloud-sdk-bookworm main",  # another project's suite name
    ]
    assert switch_sources(DEB822_12, "bullseye", "bookworm") == DEB822_12  # nothing of another release


def test_the_mirrors_are_asked_for_the_new_suites_over_http_only():
    from deploy.commands.release_upgrade import probe_urls

    pairs = [("http://m.example/debian", "trixie"), ("http://m.example/debian/", "trixie"), ("file:/srv/r", "trixie")]
    assert probe_urls(pairs) == ["http://m.example/debian/dists/trixie/"]


FACTS_12 = """\
codename=bookworm
version=12
python=3.11
free_kb=9000000
source=/etc/apt/sources.list.d/debian.sources
cluster=15  main    5432 online postgres /var/lib/postgresql/15/main /var/log/postgresql/postgresql-15-main.log
"""


def test_a_debian_12_server_with_its_one_cluster_is_upgraded_to_13():
    from deploy.commands.release_upgrade import Cluster, parse_facts
    from deploy.release_upgrade import announce, check

    facts = parse_facts(FACTS_12)
    assert facts.sources == ("/etc/apt/sources.list.d/debian.sources",)
    assert check(facts, "root@h") == ("bookworm", "trixie", Cluster("15", "main", 5432, "online"))
    line = announce("root@h", "bookworm", "trixie", Cluster("15", "main", 5432, "online"))
    assert "from Debian 12 (bookworm) to Debian 13 (trixie)" in line and "Expected downtime" in line


@pytest.mark.parametrize(
    "change, refusal",
    [
        (("codename=bookworm", "codename=trixie"), "already runs Debian 13 (trixie)"),
        (("codename=bookworm", "codename=noble"), "runs noble (VERSION_ID 12), not Debian 12 (bookworm)"),
        (("codename=bookworm", "codename="), "runs an unknown release"),
        (("online", "down"), "must be online"),
        (("free_kb=9000000", "free_kb=100"), "0 MB free under /var"),
    ],
)
def test_a_server_os_update_release_cannot_upgrade_is_refused_with_what_to_do(change, refusal):
    from deploy.commands.release_upgrade import parse_facts
    from deploy.release_upgrade import check

    with pytest.raises(DeployError) as raised:
        check(parse_facts(FACTS_12.replace(*change)), "root@h")
    assert refusal in str(raised.value) and "\n" not in str(raised.value)


def test_two_clusters_are_refused():
    from deploy.commands.release_upgrade import parse_facts
    from deploy.release_upgrade import check

    two = FACTS_12 + "cluster=17 main 5433 online postgres /var/lib/postgresql/17/main x\n"
    with pytest.raises(DeployError, match="clusters 15/main \\(online, port 5432\\), 17/main"):
        check(parse_facts(two), "root@h")


def test_row_counts_are_read_by_table():
    from deploy.commands.release_upgrade import parse_row_counts

    assert parse_row_counts("public.auth_user 3\npublic.prayers_prayer 120\n\n") == {
        "public.auth_user": 3,
        "public.prayers_prayer": 120,
    }
    assert parse_row_counts("") == {}


def test_os_update_release_refuses_a_cluster_and_reboot_before_connecting(tmp_path):
    """No host is reached: the refusals are the command line's and the config's."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fab")), "-H", "root@192.0.2.1", "os-update", "--release", "--reboot"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.strip() == "error: --release always reboots: leave --reboot out."
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fab")), "-H", "root@192.0.2.1", "os-update", "--yes"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "--yes goes with --release" in result.stderr


def test_os_update_release_refuses_a_cluster_with_the_host_by_host_way(tmp_path):
    from deploy.release_upgrade import release_upgrade
    from deploy.site import Site

    path = tmp_path / "deploy.toml"
    path.write_text(
        '[environments.cluster.roles]\nweb = ["root@10.0.0.2"]\nworker = ["root@10.0.0.2"]\n'
        'beat = ["root@10.0.0.2"]\ndb = ["root@10.0.0.4"]\n'
    )
    with pytest.raises(DeployError, match="upgrades a site of one host; on a cluster, upgrade host by host"):
        release_upgrade(Site(load_config(path, "cluster"), []), yes=True)


def test_a_rule_or_conf_d_file_the_new_cluster_lacks_keeps_the_old_one():
    from deploy.commands.release_upgrade import parse_lost_settings

    same = "old local all postgres peer\nnew local all postgres peer\n"
    assert parse_lost_settings(same) == []
    lost = same + "old hostssl prayer_room prayer_room 10.0.0.2/32 scram-sha-256\nold conf.d/listen.conf ab12\n"
    assert parse_lost_settings(lost + "new conf.d/listen.conf cd34\n") == [
        "conf.d/listen.conf ab12",
        "hostssl prayer_room prayer_room 10.0.0.2/32 scram-sha-256",
    ]


def test_the_packages_an_upgrade_removes_are_named():
    from deploy.commands.release_upgrade import parse_upgrade_counts, removed_packages

    out = (
        "Calculating upgrade...\nThe following packages will be REMOVED:\n  libicu72* libssl3 perl-modules-5.36\n"
        "  python3.11-venv\nThe following NEW packages will be installed:\n  libssl3t64\n"
        "172 upgraded, 44 new, 14 to remove and 0 not upgraded.\n"
    )
    assert removed_packages(out) == ["libicu72", "libssl3", "perl-modules-5.36", "python3.11-venv"]
    assert removed_packages("0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n") == []
    assert parse_upgrade_counts("172 upgraded, 44 newly installed, 14 to remove and 0 not upgraded.\n") == (172, 44, 14)


FAKE_APT = """#!/bin/sh
# Fails with LOCKED_ERROR while its count file says so, then fetches; each call logged.
echo call >> "$CALLS"
left=$(cat "$LOCKED")
if [ "$left" -gt 0 ]; then echo $((left - 1)) > "$LOCKED"; echo "$ERROR" >&2; exit 100; fi
echo "Reading package lists..."
"""


def run_apt_update(tmp_path: Path, locked: int, error: str) -> tuple[subprocess.CompletedProcess, int]:
    """The real shell line of `apt_update` with an apt-get on PATH that fails `locked` times with `error` first."""
    fake = tmp_path / "apt-get"
    fake.write_text(FAKE_APT)
    fake.chmod(0o755)
    (tmp_path / "locked").write_text(f"{locked}\n")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "LOCKED": str(tmp_path / "locked"), "ERROR": error}  # fmt: skip
    line = updates_commands.apt_update(pause=0, tries=5)
    result = subprocess.run(["sh", "-c", f"{line} && echo installed"], env=env, capture_output=True, text=True)
    return result, len((tmp_path / "calls").read_text().splitlines())


LISTS_LOCKED = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 2770 (apt-get)"


def test_apt_update_waits_while_apts_daily_fetch_holds_the_lists_lock(tmp_path):
    result, calls = run_apt_update(tmp_path, locked=3, error=LISTS_LOCKED)
    assert result.returncode == 0 and calls == 4, result
    assert result.stdout.split("\n")[-2:] == ["installed", ""], result.stdout


def test_apt_update_gives_up_on_the_lock_after_its_tries_and_stops_the_commands_after_it(tmp_path):
    result, calls = run_apt_update(tmp_path, locked=9, error=LISTS_LOCKED)
    assert result.returncode == 100 and calls == 5 and "installed" not in result.stdout, result
    assert result.stderr.strip() == LISTS_LOCKED


def test_apt_update_stops_at_once_on_any_other_error(tmp_path):
    error = "E: The repository 'http://deb.debian.org/debian nowhere Release' does not have a Release file."
    result, calls = run_apt_update(tmp_path, locked=1, error=error)
    assert result.returncode == 100 and calls == 1 and "installed" not in result.stdout, result
    assert result.stderr.strip() == error
