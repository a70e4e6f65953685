"""The command lines of OS updates: the facts provision reads, what `fab status` reads, the upgrade and the
reboot of `fab os-update`."""

from __future__ import annotations

APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300"
REBOOT_REQUIRED = "/var/run/reboot-required"
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
# The timers of Debian's apt package: one fetches the package lists, the other runs unattended-upgrade.
APT_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer")

# The release's codename and the suites apt knows (o=origin, n=suite, l=label) on the server.
FACTS = """\
echo "codename=$(. /etc/os-release && echo "$VERSION_CODENAME")"
apt-cache policy 2>/dev/null | sed -n 's/^ *release /release /p'
"""

# `fab status`: the upgrades waiting (a simulation: nothing is locked or changed), how old the package lists are,
# when unattended-upgrade last ran, and whether a reboot is pending (since when, for which packages).
PENDING = f"""\
now=$(date +%s)
echo "now=$now"
apt-get -s -o Debug::NoLocking=1 upgrade 2>/dev/null | sed -n 's/^Inst /inst /p'
for stamp in update-success-stamp unattended-upgrades-stamp; do
    test -f /var/lib/apt/periodic/$stamp && echo "$stamp=$(stat -c %Y /var/lib/apt/periodic/$stamp)"
done
if [ -f {REBOOT_REQUIRED} ]; then
    echo "reboot=$(stat -c %Y {REBOOT_REQUIRED})"
    echo "reboot_packages=$(sort -u {REBOOT_REQUIRED}.pkgs 2>/dev/null | tr '\\n' ' ')"
fi
"""


def upgrade() -> str:
    """The package lists fetched, then every upgrade installed without a question, keeping the config files
    provision wrote (a package's new default config is left beside as .dpkg-dist)."""
    options = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
    return f"{APT} update && {APT} {options} upgrade"


def reboot() -> str:
    """Queue the reboot and return at once (the SSH session ends as sshd stops)."""
    return "systemctl --no-block reboot"
