"""The deploy library behind fabfile.py: config, rendering, provisioning, releases, verification."""
