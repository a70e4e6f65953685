# Cluster traffic tests (tests/deploy/test_cluster_e2e.py): tcpdump on this machine captures what the cluster's
# containers send each other (tests/support/capture.py) during a deploy and a request loop. Sourced by .ci/run after
# `apt-get update`.
apt-get install -y -qq tcpdump >/dev/null
