# TLS tests (tests/deploy/test_tls_e2e.py): Debian's pebble, a real ACME server (with pebble-challtestsrv as
# its DNS), issuing to the nspawn container of 25-provision.sh; openssl makes pebble's throwaway listener CA.
# Sourced by .ci/run after `apt-get update`.
apt-get install -y -qq pebble openssl >/dev/null
