"""Deployments of the flows: the catalog on a nightly cron, `convert` on demand.

Across machines (a Prefect server and a work pool; see prefect.yaml and the README):

    prefect work-pool create mha2mla --type process
    prefect deploy --all                        # from the repository root, reads prefect.yaml
    prefect worker start --pool mha2mla         # on every machine that runs conversions

On one machine without a work pool, this module serves the same two deployments from its own process:

    python -m flows.deploy [CATALOG_FILE]
"""

from __future__ import annotations

import sys

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.catalog import catalog
from flows.convert import convert

WORK_POOL = "mha2mla"
CATALOG_CRON = "0 2 * * *"  # 02:00 UTC every day
DEFAULT_CATALOG = "catalog.example.yaml"


def deployments(catalog_file: str = DEFAULT_CATALOG) -> list[RunnerDeployment]:
    """The scheduled catalog deployment and the on-demand convert deployment, as prefect.yaml defines them."""
    return [
        catalog.to_deployment(name="catalog-nightly", cron=CATALOG_CRON, parameters={"file": catalog_file}),
        convert.to_deployment(name="convert"),
    ]


if __name__ == "__main__":
    serve(*deployments(*sys.argv[1:2]))
