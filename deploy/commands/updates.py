"""The command lines of OS updates: the facts provision reads, what `fab status` reads, the upgrade and the
reboot of `fab os-update`."""

from __future__ import annotations

APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300"
REBOOT_REQUIRED = "/var/run/reboot-required"


def apt_update(pause: float = 5, tries: int = 60) -> str:
    """`apt-get update`, waiting while another apt holds the package lists' lock. DPkg::Lock::Timeout makes apt-get
    wait for dpkg's lock only: while apt's daily timer fetches the lists (it catches up minutes after a boot),
    `apt-get update` fails at once with "Could not get lock /var/lib/apt/lists/lock". Tried again every `pause`
    seconds, `tries` times, while that is its error; any other error at once, as apt printed it."""
    return (
        f"{{ n=0; until out=$({APT} update 2>&1); do "
        'case "$out" in *"/var/lib/apt/lists/lock"*) ;; *) printf "%s\\n" "$out" >&2; exit 100;; esac; '
        f'n=$((n + 1)); [ "$n" -lt {tries} ] || {{ printf "%s\\n" "$out" >&2; exit 100; }}; sleep {pause}; done; '
        'printf "%s\\n" "$out"; }'
    )


BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
# The timers of Debian's apt package: one fetches the package lists, the other runs unattended-upgrade.
APT_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer")

# The release's codename and the suites apt knows (o=origin, n=suite, l=label) on the server.
FACTS = """\
echo "codename=$(. /etc/os-release && echo "$VERSION_CODENAME")"
apt-cache policy 2>/dev/null | sed -n 's/^ *release /release /p'
"""

PERIODIC = "/var/lib/apt/periodic"
# What a successful `apt-get update` leaves, newest wins: Debian's apt writes each index file it fetched anew (a
# source whose InRelease did not change since keeps its older time), apt's daily timer touches update-stamp, and
# UPDATE_HOOK (provision's, as Ubuntu's update-notifier-common has it) touches update-success-stamp after every one.
LISTS_FETCHED = (f"{PERIODIC}/update-success-stamp", f"{PERIODIC}/update-stamp", "/var/lib/apt/lists/*_InRelease",
                 "/var/lib/apt/lists/*_Release")  # fmt: skip
# unattended-upgrade's own stamp, and the one apt's daily timer touches after unattended-upgrade succeeded.
UNATTENDED_RAN = (f"{PERIODIC}/unattended-upgrades-stamp", f"{PERIODIC}/upgrade-stamp")
UPDATE_HOOK = f'APT::Update::Post-Invoke-Success {{"touch {PERIODIC}/update-success-stamp 2>/dev/null || true";}};'


def newest_mtime(key: str, paths: tuple[str, ...]) -> str:
    """A shell line printing KEY=the newest mtime (Unix time) of `paths` (globs), nothing when none exists."""
    return (
        f"{key}=$(stat -c %Y {' '.join(paths)} 2>/dev/null | sort -n | tail -n 1); "
        f'[ -n "${key}" ] && echo "{key}=${key}"'
    )


# `fab status`: the upgrades waiting (a simulation: nothing is locked or changed), how old the package lists are,
# when unattended-upgrade last ran, and whether a reboot is pending (since when, for which packages).
PENDING = f"""\
now=$(date +%s)
echo "now=$now"
apt-get -s -o Debug::NoLocking=1 upgrade 2>/dev/null | sed -n 's/^Inst /inst /p'
{newest_mtime("lists", LISTS_FETCHED)}
{newest_mtime("unattended", UNATTENDED_RAN)}
if [ -f {REBOOT_REQUIRED} ]; then
    echo "reboot=$(stat -c %Y {REBOOT_REQUIRED})"
    echo "reboot_packages=$(sort -u {REBOOT_REQUIRED}.pkgs 2>/dev/null | tr '\\n' ' ')"
fi
"""


def upgrade() -> str:
    """The package lists fetched, then every upgrade installed without a question, keeping the config files
    provision wrote (a package's new default config is left beside as .dpkg-dist)."""
    options = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
    return f"{apt_update()} && {APT} {options} upgrade"


def reboot() -> str:
    """Queue the reboot and return at once (the SSH session ends as sshd stops)."""
    return "systemctl --no-block reboot"
