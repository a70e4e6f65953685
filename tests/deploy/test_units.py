"""The list of the kit's systemd units that the end-to-end tests measure with `systemd-analyze security`
(tests/support/units.py) names every unit the templates make: a new unit cannot go unmeasured."""

from __future__ import annotations

from pathlib import Path

from deploy.config import load_config
from deploy.render.archive import render_backup_units, render_verify_units
from deploy.render.db_host import FIREWALL_UNIT
from deploy.render.systemd import BACKUP_SERVICE, EGRESS_UNIT, UNIT, WATCHDOG_SERVICE
from tests.support.units import DROP_INS, SERVICES, measured_in, systemd_templates

E2E = Path(__file__).resolve().parent


def test_every_systemd_template_is_named_by_the_exposure_list():
    templates = systemd_templates()
    services = {name for name, kind in templates.items() if kind == "service"}
    assert services == {service.template for service in SERVICES}, "a service template the e2e does not measure"
    assert {name for name, kind in templates.items() if kind == "drop-in"} == set(DROP_INS)
    timers = {name for name, kind in templates.items() if kind == "timer"}
    assert timers and {timer.replace(".timer.", ".service.") for timer in timers} <= services  # each starts one
    # The other templates (nginx, PostgreSQL, Redis, pgBackRest, supervisorctl configs) are no systemd files.
    assert "nginx-site.conf.j2" not in templates and "supervisorctl.conf.j2" not in templates


def test_the_listed_units_are_the_ones_provision_installs(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text("[defaults]\nbackup_repository = 's3://bucket/site'\n")
    config = load_config(path)
    archive = {
        **render_backup_units(config),
        **render_verify_units(config, data_directory="/var/lib/postgresql/17/main"),
    }
    installed = {UNIT, BACKUP_SERVICE, WATCHDOG_SERVICE, EGRESS_UNIT, FIREWALL_UNIT}
    installed |= {name for name in archive if name.endswith(".service")}
    assert {service.unit for service in SERVICES} == installed


def test_each_listed_service_is_measured_by_its_module_on_each_release_it_boots():
    for service in SERVICES:
        source = (E2E / f"{service.module}.py").read_text()
        assert "measured_in(__name__)" in source, service.module  # it measures what the list gives it
        assert service in measured_in(f"tests.deploy.{service.module}")
        assert set(service.bound) <= {"trixie", "bookworm"} and "trixie" in service.bound, service
    assert {service.unit for service in measured_in("test_security_e2e")} >= {WATCHDOG_SERVICE, EGRESS_UNIT}
