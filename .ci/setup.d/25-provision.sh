# Provision tests (tests/deploy/test_provision_e2e.py): a fresh Debian 12 "VPS" booted with systemd-nspawn,
# reached over real SSH. debootstrap builds its rootfs once into /var/cache/prayer-room-tests (about 75 s,
# reused by later runs); nftables masquerades the container's traffic so its apt-get reaches the mirror.
# Sourced by .ci/run after `apt-get update`.
apt-get install -y -qq debootstrap systemd-container nftables openssh-client iproute2 >/dev/null
python3 tests/support/nspawn.py build
