"""Hostile input: `/openapi.json` describes every body the server parses, and schemathesis
fuzzing over it (plus the hand-written `HOSTILE` rows) never gets a 5xx, and every error is
OpenAI's error object. One tiny server with `--max-model-len 64`, so generated requests stay
short; the cases are seeded, so a failure here reproduces."""
import pytest
import schemathesis

from engine.config import EngineConfig
from server.api import ROUTES, build_app
from server.bench_fuzz import run_fuzz
from server.config import ServerConfig
from tests.conftest import start_tiny_server, stop_server

FUZZ_CASES = 500
FUZZ_SEED = 0


@pytest.fixture(scope="module")
def document() -> dict:
    return build_app(EngineConfig(), ServerConfig(), lambda: None).openapi()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    server = start_tiny_server(tmp_path_factory.mktemp("fuzz"), ["--max-model-len", "64"])
    yield server
    stop_server(server)


def test_schemathesis_loads_every_operation_of_the_document(document):
    schema = schemathesis.openapi.from_dict(document)
    results = list(schema.get_all_operations())
    errors = [str(r.err()) for r in results if hasattr(r, "err")]
    assert errors == [] and len(results) == len(ROUTES)


@pytest.mark.parametrize("route", [r for r in ROUTES if r.body is not None],
                         ids=lambda r: r.path)
def test_each_body_route_documents_its_request_model_and_errors(document, route):
    operation = document["paths"][route.path][route.method.lower()]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{route.body.__name__}"}
    assert set(document["components"]["schemas"][route.body.__name__]["properties"]) == {
        field.alias or name for name, field in route.body.model_fields.items()}
    error = operation["responses"]["4XX"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}


def test_fuzzing_finds_no_5xx_and_only_openai_errors(tiny):
    report = run_fuzz(tiny.base_url, cases=FUZZ_CASES, seed=FUZZ_SEED)
    assert report.cases >= FUZZ_CASES
    assert report.server_errors == 0
    assert [f"{f.operation} -> {f.status}: {f.why}\n{f.curl}" for f in report.failures] == []
    assert report.statuses[200] > 0 and report.statuses[400] > 0
