# The deploy layer's backups (tests/deploy/test_data_e2e.py) run the machine's pg_dump against the tests'
# PostgreSQL, and pg_dump refuses a newer server: with Debian's server binaries installed, the tests'
# throwaway cluster is made from them (tests/support/services.py), so both are PostgreSQL 15 on Debian 12.
# Only the binaries are used: no cluster of the package is relied on. Sourced by .ci/run after `apt-get update`.
apt-get install -y -qq postgresql postgresql-client >/dev/null
