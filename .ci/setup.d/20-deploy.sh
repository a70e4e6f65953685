# Deploy tests (tests/deploy/test_deploy_e2e.py) and bench/deploy.py: an sshd the test starts on a loopback
# port, nginx in front of the two web ports, Debian's python3 (with venv) building the release virtualenvs,
# and the unprivileged app user the programs run as. Sourced by .ci/run after `apt-get update`.
apt-get install -y -qq openssh-server openssh-client nginx-light python3-venv git procps sudo >/dev/null
mkdir -p /run/sshd
id prayer-room-e2e >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/prayer-room-e2e \
    --shell /usr/sbin/nologin prayer-room-e2e
# A user that logs in over SSH but cannot sudo: the "no sudo" refusal is tested with it.
id prayer-room-nosudo >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/prayer-room-nosudo \
    --shell /bin/sh -p '*' prayer-room-nosudo
# A user that deploys through passwordless sudo, as on VPS images without root logins.
id prayer-room-sudoer >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/prayer-room-sudoer \
    --shell /bin/sh -p '*' prayer-room-sudoer
echo 'prayer-room-sudoer ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/prayer-room-sudoer
chmod 0440 /etc/sudoers.d/prayer-room-sudoer
