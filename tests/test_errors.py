"""User-facing error text: a pydantic ValidationError reads as `field.path: message (got value)` lines."""

import pytest
from pydantic import ValidationError

from flows.convert import ConvertParams
from flows.errors import describe_error


def test_validation_errors_read_one_line_per_field_without_the_docs_link():
    with pytest.raises(ValidationError) as info:
        ConvertParams(model="m", mla={"kv_rnak": 8}, finetune={"data": "t.txt", "synthetic_fraction": 2})
    text = describe_error(info.value)
    assert text.splitlines() == [
        "invalid ConvertParams:",
        "  mla.kv_rnak: Unexpected keyword argument (got 8)",
        "  finetune.synthetic_fraction: Input should be less than or equal to 1 (got 2)",
    ]
    assert describe_error(ValueError("plain")) == "plain"


def test_a_failed_catalog_entry_is_summarised_without_uri_passwords():
    from flows.catalog import summary_row

    class FailedState:
        def is_completed(self):
            return False

        def result(self, raise_on_failure=True):
            return ConnectionError("MLflow at http://mlflow:hunter2@tracking:5000 refused the connection\nmore")

    row = summary_row(ConvertParams(model="m", name="m-r8"), FailedState())
    assert row["error"] == "ConnectionError: MLflow at http://mlflow:***@tracking:5000 refused the connection"
