"""Data loading for the mha2mla_* lm-eval tasks: the normalized JSONL files of `shared/data/mc` (schema in that
directory's README). lm-eval calls `load_mc` with the task's metadata and `dataset_kwargs`; the data directory
arrives as metadata `mc_data_dir`, so the installed YAML files never hard-code where the data lives:

    TaskManager(include_path=<this dir>, metadata={"mc_data_dir": "/path/to/shared/data/mc"})
    lm_eval --include_path <this dir> --metadata '{"mc_data_dir": "/path/to/shared/data/mc"}' --tasks ...
"""

from __future__ import annotations

from pathlib import Path

import datasets


def load_mc(
    mc_data_dir: str | None = None, file: str = "", split: str = "test", subject: str | None = None, **_metadata
) -> datasets.DatasetDict:
    """The split `split` of `<mc_data_dir>/<file>`, only the rows of `subject` when given (MMLU)."""
    if mc_data_dir is None:
        raise ValueError(
            "the mha2mla_* tasks need the directory of the normalized MC files as metadata 'mc_data_dir': "
            "lm_eval --metadata '{\"mc_data_dir\": \"DIR\"}', or mha2mla convert MODEL --mc-tasks TASKS --mc-data-dir DIR"
        )
    path = Path(mc_data_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; point --mc-data-dir at the directory holding {file}")
    data = datasets.load_dataset("json", data_files={split: str(path)})
    if subject is not None:
        data = data.filter(lambda doc: doc["subject"] == subject)
    return data
