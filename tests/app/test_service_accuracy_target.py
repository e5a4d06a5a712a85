"""The accuracy target over HTTP: ``max_accuracy_loss`` with text calibration (its held-out part
is what the target is measured on), ``layer_overrides`` as form fields, the trials in
report.json, and the refusals at submission."""

from __future__ import annotations

import pytest

from tests.app.conftest import assert_problem, run_to_report, upload
from tests.app.test_service_text import _no_jobs, _paragraphs, _text, tiny_llama  # noqa: F401 (fixture)

pytestmark = pytest.mark.minilm  # the tiny Llama borrows MiniLM's tokenizer files


def test_target_without_any_data_is_422(paused_service, tiny_llama):  # noqa: F811
    response = paused_service.post(
        "/v1/quantize", files=upload(tiny_llama), data={"bits": "4", "max_accuracy_loss": "0.01"}
    )
    body = assert_problem(response, 422, "configuration-error")
    assert "needs data to measure" in body["detail"] and "eval" in body["suggestion"]
    _no_jobs(paused_service)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"bits": "4", "layer_overrides": "*.q_proj=int3"}, "unknown precision 'int3'"),
        ({"bits": "4", "max_accuracy_loss": "2"}, "max_accuracy_loss must be a number in (0, 1)"),
        ({"bits": "4", "max_trials": "3"}, "max_trials=3 is not used"),
    ],
    ids=["precision", "range", "trials-without-target"],
)
def test_bad_target_fields_are_422(paused_service, tiny_llama, data, fragment):  # noqa: F811
    response = paused_service.post("/v1/quantize", files=upload(tiny_llama), data=data)
    body = assert_problem(response, 422, "configuration-error")
    assert fragment in body["detail"] and body["suggestion"]
    _no_jobs(paused_service)


def test_target_on_held_out_text_with_trials_in_the_report(service, tiny_llama):  # noqa: F811
    """int4 of a random tied Llama to within 0.5% perplexity: the search moves layers (plain
    int4 costs this model more), the report lists each trial and the overrides it chose, and
    the job's metrics summarise it."""
    job, report = run_to_report(
        service,
        {**upload(tiny_llama), **_text("calibration.txt", _paragraphs(40))},
        {
            "bits": "4",
            "group_size": "64",
            "seq_len": "64",
            "max_accuracy_loss": "0.005",
            "layer_overrides": "lm_head=int8",
        },
        timeout=600,
    )
    target = report["library_metrics"]["accuracy_target"]
    assert target["metric"] == "perplexity" and target["trials"]
    assert target["trials"][0]["moved"] == 0
    assert job["metrics"]["accuracy_target_trials"] == len(target["trials"])
    assert job["metrics"]["accuracy_target_met"] == target["met"]
    overrides = report["info"]["layer_overrides"]
    assert overrides["lm_head"] == "int8"  # the caller's own override is kept and recorded
    assert job["metrics"]["layers_moved"] == target["moved_layers"] == len(overrides) - 1
    # measured on the held-out text, as the report's own accuracy figures are
    assert "held out" in report["accuracy"]["source"]
    if target["met"]:
        change = report["accuracy"]["perplexity_change_pct"]
        assert change <= 0.5 + 1e-6, report["accuracy"]


def test_client_sends_overrides_and_eval_and_checks_data_first(paused_service, tiny_model_file, tmp_path):
    from mono_quant.client import MonoQuantClient
    from mono_quant.errors import ConfigurationError

    client = MonoQuantClient(http=paused_service)
    with pytest.raises(ConfigurationError, match="needs data to measure"):
        client.submit(tiny_model_file, bits=4, max_accuracy_loss=0.01)  # refused before any upload
    assert paused_service.get("/v1/jobs").json()["items"] == []
    job = client.submit(tiny_model_file, bits=4, layer_overrides={"0": "int8", "2": "float"})
    assert job["params"]["layer_overrides"] == ["0=int8", "2=float"]
    again = client.submit(tiny_model_file, bits=4, layer_overrides=[("0", "int8")])
    assert again["params"]["layer_overrides"] == ["0=int8"]
