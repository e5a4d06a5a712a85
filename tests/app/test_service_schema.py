"""Property-based run of schemathesis against /openapi.json: no 500, no schema violation."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from tests.app.conftest import settings_for

pytestmark = pytest.mark.slow


_DATA_DIR = Path(tempfile.mkdtemp(prefix="monoquant-fuzz-"))
_APP = create_app(settings_for(_DATA_DIR, max_upload_bytes=1_000_000))
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


# schemathesis runs the app's lifespan around its calls; the data directory goes at exit.
atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_has_no_server_errors_and_matches_its_schema(case):
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )
