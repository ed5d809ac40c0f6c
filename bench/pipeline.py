"""Orchestration overhead of the pipeline on the real SmolLM2-135M, and the wall time of a fully cached rerun.

    .venv/bin/python bench/pipeline.py [--repeats 3]

Three runs, each in a fresh interpreter (start-up and imports count in all three):
- direct: the core calls of the flow's stages in one script (load, sample calibration ids, score RoPE pairs,
  convert, save_pretrained, PPL and KV bytes/token of the original and the converted model);
- flow:   `mha2mla convert smollm2-135m --no-check` on an empty embedded store (Prefect's ephemeral API,
  MLflow on sqlite, local artifacts; their databases are created beforehand, as after a first use);
- cached: the same command again: every stage a cache hit.

With `--repeats N` the three runs are repeated N times (each flow run on an empty artifact store) and the
medians are compared: on a shared machine one pair of runs can differ by more than the 5% being measured.
Prints wall and CPU seconds (user + sys of the process tree) of each, the flow's overhead over direct, and
appends one JSON line to bench/results/pipeline.jsonl. Targets: overhead < 5%, cached rerun < 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def direct() -> None:
    """The flow's core calls, nothing else."""
    import tempfile

    from mha2mla_core import MLAConfig, default_calibration_texts, load_model, sample_calibration, score_rope
    from mha2mla_core.conversion.convert import convert_to_mla_with_report
    from mha2mla_core.evaluation.perplexity import perplexity
    from mha2mla_core.evaluation.inference import probe_kv_bytes_per_token
    from tasks.evaluate import EvalParams
    from tasks.inputs import DEFAULT_EVAL_TEXT, DataSource, read_text
    from tasks.sample_calibration import CalibrationParams

    cfg, calib, evaluation = MLAConfig(), CalibrationParams(), EvalParams()  # the CLI's defaults
    model, tokenizer = load_model(MODEL)
    sample = sample_calibration(default_calibration_texts(), tokenizer, calib.num_tokens, cfg.calib_seq_len, calib.seed)
    scores = score_rope(model, sample.input_ids, cfg.calib_seq_len)
    mla, _ = convert_to_mla_with_report(model, cfg, sample.input_ids, scores)
    with tempfile.TemporaryDirectory() as tmp:
        mla.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    text = read_text(DataSource(source=DEFAULT_EVAL_TEXT, digest=""))
    for network in (model, mla):
        ppl = perplexity(network, tokenizer, text, window=evaluation.window, max_tokens=evaluation.max_tokens)
        print(f"ppl {ppl.ppl:.2f}  kv bytes/token {probe_kv_bytes_per_token(network, evaluation.kv_probe_tokens):.0f}")


def timed(command: list[str], env: dict[str, str], expect: str = "") -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of a command, which must succeed and print `expect`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    if expect not in done.stdout:
        raise RuntimeError(f"{' '.join(command)} did not print {expect!r} (code changed between runs?):\n{done.stdout[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(repeats: int) -> dict[str, list[tuple[float, float]]]:
    """`repeats` rounds of direct, flow (on an empty artifact store) and cached; the databases are shared."""
    python, cli = sys.executable, str(Path(sys.executable).with_name("mha2mla"))
    runs: dict[str, list[tuple[float, float]]] = {"direct": [], "flow": [], "cached": []}
    with tempfile.TemporaryDirectory(prefix="mha2mla-bench-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MHA2MLA_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "MHA2MLA_PREFECT_HOME": f"{tmp}/prefect", "PREFECT_HOME": f"{tmp}/prefect",
               "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
        # create both databases first (a one-time cost of any new installation)
        Path(tmp, "prefect").mkdir()
        timed([cli, "runs"], env)
        timed([python, "-c", "from prefect import flow; flow(name='warm-up')(lambda: None)()"], env)
        for i in range(repeats):
            env["MHA2MLA_ARTIFACT_ROOT"] = f"{tmp}/artifacts-{i}"  # every flow run starts with no cache
            runs["direct"].append(timed([python, __file__, "--direct"], env))
            runs["flow"].append(timed([cli, "convert", MODEL, "--no-check"], env))
            runs["cached"].append(timed([cli, "convert", MODEL, "--no-check"], env, expect=" 0 ran, "))
    return runs


def main(repeats: int) -> None:
    runs = measure(repeats)
    median = {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for name, v in runs.items()}
    overhead = 100 * (median["flow"][0] / median["direct"][0] - 1)
    cpu_overhead = 100 * (median["flow"][1] / median["direct"][1] - 1)
    for name, (wall, cpu) in median.items():
        walls = ", ".join(f"{w:.1f}" for w, _ in runs[name])
        print(f"{name:<7} wall {wall:7.1f} s   cpu {cpu:7.1f} s   (median of {repeats}; walls {walls})")
    print(f"orchestration overhead: {overhead:+.1f}% wall, {cpu_overhead:+.1f}% cpu (target < 5%)")
    print(f"fully cached rerun: {median['cached'][0]:.1f} s wall incl. interpreter start (target < 15 s)")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "repeats": repeats, **{f"{k}_wall_s": round(v[0], 2) for k, v in median.items()},
              **{f"{k}_cpu_s": round(v[1], 2) for k, v in median.items()},
              **{f"{k}_walls_s": [round(w, 2) for w, _ in v] for k, v in runs.items()},
              "overhead_wall_pct": round(overhead, 2), "overhead_cpu_pct": round(cpu_overhead, 2)}  # fmt: skip
    out = REPO / "bench" / "results" / "pipeline.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--direct"]:
        direct()
    else:
        parser = argparse.ArgumentParser(description="flow vs direct core calls, and a fully cached rerun")
        parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs; medians are reported")
        main(parser.parse_args().repeats)
