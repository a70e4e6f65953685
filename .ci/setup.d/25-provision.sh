# Provision tests (tests/deploy/test_provision_e2e.py and the other container layers): fresh Debian 13 and Debian 12
# "VPS"es booted with systemd-nspawn, reached over real SSH. debootstrap builds one rootfs per release once into
# /var/cache/prayer-room-tests (one to three minutes each, reused by later runs): .ci/run starts that build in the
# background before lint and waits for it before the tests. nftables masquerades the containers' traffic so their
# apt-get reaches the mirror. Sourced by .ci/run after `apt-get update`.
apt-get install -y -qq debootstrap systemd-container nftables openssh-client iproute2 >/dev/null
