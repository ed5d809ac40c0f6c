#!/usr/bin/env bash
# The whole `mha2mla convert` pipeline (Prefect + MLflow, embedded default) on a bare offline GPU machine.
#
#   bash bench/gpu_pipeline.sh stage       # only copy the carried folders to $GPU_KIT, join the GGUF, install wheels
#   bash bench/gpu_pipeline.sh flow        # (a) SmolLM2-135M GGUF, --recipe gpu on 2 GPUs, wikitext-2 + MC all + needle
#   bash bench/gpu_pipeline.sh convert8b   # (b) random Llama-3-8B shape (bf16 HF dir), --recipe none on 1 GPU
#   bash bench/gpu_pipeline.sh all         # (a) then (b); (b) runs even if (a) failed
#   bash bench/gpu_pipeline.sh speed       # GPU tests of the decode path, bench.profile_step, bench.peer_flashinfer
#   bash bench/gpu_pipeline.sh scale1b     # bench.scale's Llama-3.2-1B shape on 1 then 2 GPUs
#   VARIANTS="a b" bash bench/gpu_pipeline.sh quality   # bench/finetune.py variants, saved, then the six tasks and
#                                          # the needle on each (bench/evaluate.py; ORIGINAL=1: the original too;
#                                          # VARIANTS_GPU1: more variants on GPU 1 at the same time;
#                                          # FOLLOWUPS_GPU1=1: then issue 17's follow-ups on GPU 1, see part_followups;
#                                          # KV_BITS=4: each variant also scored with an int4 latent cache)
#   bash bench/gpu_pipeline.sh 8b+speed    # convert8b on GPU 0 while speed runs on GPU 1 (one 2-GPU call)
#
# A device session's calls (kind nvidia-h200-x2; each within ~30 s of the last, so the machine and $GPU_KIT stay):
#   1. `stage`, carry .carry_ma .whl;  2. `stage`, carry .carry_mb .whl_lm;  3. `stage`, carry .carry_pf1 .carry_pf2
#   4. `PART_TIMEOUT=565 ... flow`, carry .carry_data .carry_mc (then `RESUME=1 ... flow` if it was cut off)
#   5. `PART_TIMEOUT=470 ... 8b+speed`, carry .carry_fi;  6. `scale1b` if device time is left
# Quality runs (issue 14) need calls 1-3 (the model, lm-eval and the wheels), then `VARIANTS=... quality` with
# .carry_data .carry_mc, repeated until each variant is trained and scored.
#
# Run it from the repo root. Every mode first "stages": each carried folder present in the repo (.carry_pf1,
# .carry_pf2, .whl_lm, .whl, .carry_data, .carry_mc, .carry_ma, .carry_mb) is copied to $GPU_KIT (default
# /root/gpu_kit), which persists between back-to-back device calls; later calls read it from there. Once both GGUF
# parts are there they are joined into $MODEL_GGUF (default /root/ft/model.gguf); once all four wheel folders are
# there they are installed into /tmp/site (python3 -m pip --no-index --no-deps --target). MLflow is mlflow-skinny
# (registered models then pin it); the tree has no .git there, so the runs' code version is "unknown" and each
# stage's code digest names its code.
#
# Each part runs under `timeout $PART_TIMEOUT` (default 540 s, so that a 600 s device call still copies the
# results), with its own fresh MHA2MLA_HOME under /root/mha2mla_runs, and ends with the stages' wall times from
# the product's own `mha2mla runs` (the flow run's `seconds.*` metrics). Files land flat in $OUT (at most 7):
#   pipeline.log, flow.log, flow.json, flow_summary.md, convert8b.log, convert8b.json, convert8b_summary.md
# (quality: quality-gpu0.tgz and quality-gpu1.tgz, each variant's log, JSON and evaluation folder; the device returns
# only a few files a call)
#
# RESUME=1 reuses the part's last MHA2MLA_HOME instead of a fresh one: a part cut off by the timeout is rerun in the
# next call, and the stages it finished are cache hits (their wall times are in the first call's log lines).
#
# Knobs (environment): PART_TIMEOUT, EVAL_TOKENS (part a, default 65536), MC_LIMIT (part a, items per MC task and
# per MMLU subject; default 100, `all` = every item: ~30k items, minutes per model), FINETUNE_TOKENS (part a;
# default: the gpu recipe's 20M), NEEDLE_LENGTHS (part a; default NeedleParams'), CALIB_TOKENS_8B (default 8192),
# EVAL_TOKENS_8B (default 4096), CHECK_8B=1 (reload the 8B checkpoint in a fresh process; default off: it costs
# another full load), GPU_PIPELINE_TINY=1 (local CPU smoke run: .venv's python, smollm2-135m, --recipe none, a tiny
# random Llama shape, tiny budgets; nothing staged or installed).
set -uo pipefail

MODE=${1:-all}
TINY=${GPU_PIPELINE_TINY:-0}
REPO=$PWD
KIT=${GPU_KIT:-/root/gpu_kit}
SITE=${GPU_SITE:-/tmp/site}
MODEL_GGUF=${MODEL_GGUF:-/root/ft/model.gguf}
RUNS=${GPU_RUNS:-/root/mha2mla_runs}
OUT=${OUT:-$REPO/runs/gpu_pipeline_out}
PART_TIMEOUT=${PART_TIMEOUT:-540}
PY=${PYTHON:-python3}
if [[ $TINY == 1 ]]; then
    PY=${PYTHON:-$REPO/.venv/bin/python}
    KIT=$REPO MODEL_GGUF=smollm2-135m RUNS=${GPU_RUNS:-$(mktemp -d /tmp/gpu_pipeline_tiny.XXXX)}
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ $TINY == 1 ]]; then export PYTHONPATH=$REPO; else export PYTHONPATH=$SITE:$REPO; fi

log() { echo "[gpu_pipeline $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/pipeline.log" >&2; }
mha2mla() { "$PY" -c 'import sys; from flows.cli import app; sys.argv[0] = "mha2mla"; app()' "$@"; }
wikitext() { echo "$(kit .carry_data)/wiki.test.raw"; }  # read as stored, as the bench protocol reads it
kit() { if [[ -d $REPO/$1 && -n $(ls -A "$REPO/$1" 2>/dev/null) ]]; then echo "$REPO/$1"; else echo "$KIT/$1"; fi; }

# ---- staging: carried folders -> $GPU_KIT, the GGUF joined, the wheels installed --------------------------------
stage() {
    [[ $TINY == 1 ]] && return 0
    for dir in .carry_pf1 .carry_pf2 .whl_lm .whl .carry_data .carry_mc .carry_ma .carry_mb .carry_fi; do
        if [[ -d $REPO/$dir && -n $(ls -A "$REPO/$dir") ]]; then
            mkdir -p "$KIT/$dir" && cp -r "$REPO/$dir/." "$KIT/$dir/" && log "staged $dir ($(du -sh "$KIT/$dir" | cut -f1))"
        fi
    done
    if [[ ! -s $MODEL_GGUF && -f $KIT/.carry_ma/part && -f $KIT/.carry_mb/part ]]; then
        mkdir -p "$(dirname "$MODEL_GGUF")"
        cat "$KIT/.carry_ma/part" "$KIT/.carry_mb/part" > "$MODEL_GGUF" && log "joined $MODEL_GGUF ($(du -sh "$MODEL_GGUF" | cut -f1))"
    fi
    if [[ ! -f $SITE/.gpu_pipeline_installed ]]; then
        local missing="" dir
        for dir in .carry_pf1 .carry_pf2 .whl_lm .whl; do ls "$(kit $dir)"/*.whl >/dev/null 2>&1 || missing+=" $dir"; done
        if [[ -n $missing ]]; then log "wheels not installed yet: missing$missing"; return 0; fi
        log "installing wheels into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
            "$(kit .carry_pf1)"/*.whl "$(kit .carry_pf2)"/*.whl "$(kit .whl_lm)"/*.whl "$(kit .whl)"/*.whl 2>&1 \
            | grep -v "already exists\|WARNING: Target directory" | tee -a "$OUT/pipeline.log"
        touch "$SITE/.gpu_pipeline_installed"
    fi
}

preflight() {
    "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/pipeline.log"
import importlib, importlib.metadata as md, sys
bad = []
for name in ("prefect", "mlflow", "sqlalchemy", "alembic", "pydantic_settings", "boto3", "lm_eval", "datasets", "gguf", "torch", "transformers"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        bad.append(f"{name}: {type(err).__name__}: {err}")
for dist in ("mlflow-skinny", "prefect", "torch", "transformers"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        bad.append(f"dist {dist}: not installed")
try:
    import torch
    print(f"  python {sys.version.split()[0]}; cuda devices: {torch.cuda.device_count()}")
except ImportError as err:
    bad.append(f"torch: {err}")
print("preflight: " + ("ok" if not bad else "FAILED\n  " + "\n  ".join(bad)))
EOF
}

# ---- after a part: the evaluation table and the stages' wall times ----------------------------------------------
summarize() {  # $1 = part name; reads $OUT/$1.json (the convert --json outcome) and the store's runs
    local part=$1 md=$OUT/$1_summary.md
    {
        echo "# $part"
        echo
        echo "## stages (mha2mla runs)"
        echo '```'
        mha2mla runs --limit 1 2>&1
        echo '```'
        echo
        echo "## stage wall times (the flow run's seconds.* metrics)"
        mha2mla runs --limit 1 --json 2>/dev/null | "$PY" -c '
import json, sys
runs = json.load(sys.stdin)
if not runs:
    sys.exit(print("no flow run recorded"))
flow = runs[0]
secs = {k[len("seconds."):]: v for k, v in flow["run"]["metrics"].items() if k.startswith("seconds.")}
if secs:
    for name, value in sorted(secs.items(), key=lambda kv: kv[0] == "total"):
        print(f"- {name}: {value:.1f} s")
else:  # the flow did not finish: the stage runs start times only
    from datetime import datetime
    starts = [(s["name"], datetime.fromisoformat(str(s["start_time"]))) for s in flow["stages"]]
    status = flow["run"]["status"]
    print(f"flow run {status}: no seconds.* metrics; stage starts (offset from the first):")
    for name, at in starts:
        print(f"- {name}: +{(at - starts[0][1]).total_seconds():.1f} s")
print("\n## peak memory per stage (the worker process; torchrun ranks are other processes)")
for stage in flow["stages"]:
    name, m = stage["name"], stage["metrics"]
    if "memory.peak_rss_gib" in m:
        gpu = m.get("memory.peak_gpu_gib")
        rss, gpu_text = m["memory.peak_rss_gib"], "" if gpu is None else f", GPU {gpu:.1f} GiB reserved"
        print(f"- {name}: host RSS {rss:.1f} GiB{gpu_text}")
'
        echo
        echo "## evaluation table"
        "$PY" -c '
import json, sys
try:
    out = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError) as err:
    sys.exit(print(f"no outcome JSON ({type(err).__name__}: {err})"))
from mha2mla_core.evaluation.report import Comparison
print(Comparison.from_dict(out["table"]).to_markdown())
print("\ncheckpoint:", out["checkpoint"]["uri"])
print("registered: models:/" + str(out["model_version"]))
print("stage cache:", out["cache"])
if out.get("reloaded"):
    print("reloaded:", {k: v for k, v in out["reloaded"].items() if k != "prompt"})
' "$OUT/$part.json"
    } > "$md" 2>&1
    cat "$md"
}

run_part() {  # $1 = part name, then the convert arguments; fresh MHA2MLA_HOME, timeout, log, summary
    local part=$1 start rc
    shift
    export MHA2MLA_HOME=$RUNS/$part-$(date -u +%Y%m%d-%H%M%S)
    if [[ ${RESUME:-0} == 1 ]] && ls -d "$RUNS/$part"-* >/dev/null 2>&1; then  # the last store: finished stages hit
        MHA2MLA_HOME=$(ls -d "$RUNS/$part"-* | sort | tail -1)
    fi
    mkdir -p "$MHA2MLA_HOME"
    log "part $part: MHA2MLA_HOME=$MHA2MLA_HOME MHA2MLA_GPUS=${MHA2MLA_GPUS:-1}; mha2mla convert $*"
    start=$(date +%s)
    { timeout --kill-after=30 "$PART_TIMEOUT" "$PY" -c 'import sys; from flows.cli import app; sys.argv[0] = "mha2mla"; app()' \
        convert "$@" --json > "$OUT/$part.json"; } 2>&1 | tee "$OUT/$part.log"
    rc=${PIPESTATUS[0]}
    log "part $part: exit $rc after $(( $(date +%s) - start )) s$([[ $rc == 124 ]] && echo " (timed out at $PART_TIMEOUT s)")"
    summarize "$part" | tee -a "$OUT/$part.log"
    return "$rc"
}

# ---- speed (issue 17): the GPU tests of the decode path, the step profiles, the FlashInfer peer ---------------------
part_speed() {  # one GPU; carry .carry_fi (FlashInfer's wheels) in this call or an earlier one. Ordered by what
    # has never been measured: the GPU tests (each test's result on its own line in speed_tests.log, so a cut-off run
    # still names its failures; the decoding and cache tests first: test_kernels.py compiles a kernel for each of its
    # ~250 cases and did not finish in 300 s in session 10), the decode and training step profiles, then the
    # FlashInfer peer
    local rc=0
    timeout 300 "$PY" -m pytest -v -rf --tb=short -p no:cacheprovider -m gpu tests/test_decoding.py \
        tests/test_quant_cache.py tests/test_kernels.py > "$OUT/speed_tests.log" 2>&1 || rc=1
    grep -E "FAILED|ERROR|passed|failed" "$OUT/speed_tests.log" | tail -25
    timeout 240 "$PY" -m bench.profile_step --rows 512 2048 --top 12 2>&1 | grep -v -i warn | tee "$OUT/profile_step.log"
    timeout 150 "$PY" bench/finetune.py profile 2>&1 | grep -v -i warn | tee "$OUT/profile_train.log"  # a training step
    if ls "$(kit .carry_fi)"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$(kit .carry_fi)"/*.whl
        timeout 240 "$PY" -m bench.peer_flashinfer --out "$OUT/peer.jsonl" 2>&1 | tail -30 | tee "$OUT/peer.log"
    else
        log "no .carry_fi wheels: FlashInfer peer skipped"
    fi
    return "$rc"
}

# ---- quality (issue 14): bench/finetune.py variants trained, saved, then scored on every local MC item -----------
part_quality() {  # $1: variant names, $2: a tag (its folder and tarball). Resumable over calls: a variant cut at its
    # deadline resumes from its checkpoint, a saved one is not trained again, a scored one not scored again
    local name left rc=0 res=$RUNS/quality-$2 ck=$RUNS/quality-$2/checkpoints
    local six=arc_easy,arc_challenge,hellaswag,piqa,openbookqa,winogrande
    mkdir -p "$ck"
    local evaluate=("$PY" bench/evaluate.py --model "$MODEL_GGUF" --device cuda --tasks "$six" --mc-data-dir "$(kit .carry_mc)"
                    --mc-batch-size 64 --needle-lengths 1024,2048,4096,8000 --skip inference --ppl-text "$(wikitext)"
                    ${KV_BITS:+--kv-bits "$KV_BITS"})
    if [[ ${ORIGINAL:-0} == 1 && $2 == gpu0 && ! -f $res/eval-original/table.md ]]; then
        timeout "$(( PART_TIMEOUT - SECONDS ))" "${evaluate[@]}" --out "$res/eval-original" > "$res/eval-original.log" 2>&1
    fi
    for name in $1; do
        left=$(( PART_TIMEOUT - SECONDS ))
        if [[ ! -d $ck/$name ]] && (( left > 120 )); then
            timeout "$left" "$PY" bench/finetune.py run "$name" --gguf "$MODEL_GGUF" --data "$(kit .carry_data)" \
                --out "$res" --cache "$res/cache" --save-dir "$ck" --deadline-s "$(( left - 90 ))" \
                2>&1 | grep -v -i warn >> "$res/$name.log"
        fi
        left=$(( PART_TIMEOUT - SECONDS ))
        if [[ ! -d $ck/$name ]]; then
            log "$name: not trained to the end yet; the same call again resumes it"; rc=1
        elif [[ ! -f $res/eval-$name/table.md ]] && (( left > 60 )); then
            timeout "$left" "${evaluate[@]}" --no-original --candidate "$name=$ck/$name" --out "$res/eval-$name" \
                > "$res/eval-$name.log" 2>&1 || { log "$name: evaluation cut off or failed (eval-$name.log)"; rc=1; }
        fi
    done
    tar czf "$OUT/quality-$2.tgz" -C "$res" --exclude=checkpoints --exclude=cache .
    grep -h "^| commonsense\|^| needle acc (all" "$res"/eval-*/table.md 2>/dev/null
    return "$rc"
}

# ---- follow-ups (issue 17) on GPU 1 once its quality variants are done (FOLLOWUPS_GPU1=1 in quality mode) ---------
part_followups() {  # what the kernels and the training step still need measured, most wanted first, each cut at
    # its own timeout and at the part's: the decode kernels' GPU tests, Nsight Compute on them (where a tile's time
    # goes), the launch sweep, a training step's profile
    local log=$OUT/followups.log ncu
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    budget() { local left=$(( PART_TIMEOUT - SECONDS )); (( left > $1 )) && echo "$1" || echo "$(( left > 5 ? left : 5 ))"; }
    timeout "$(budget 150)" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
        > "$log" 2>&1 || log "followups: kernel GPU tests failed or were cut off (followups.log)"
    if [[ -n $ncu ]]; then
        log "followups: $ncu on the decode kernels"
        timeout "$(budget 180)" "$ncu" --kernel-name regex:_split --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            "$PY" -m bench.ncu_decode > "$OUT/ncu.log" 2>&1 || log "followups: ncu exit $?"
    else
        log "followups: no ncu on this machine"
    fi
    timeout "$(budget 180)" "$PY" -m bench.decode_sweep \
        --shapes smollm2-135m-r64/shared-rope smollm2-135m/shared-rope llama2-7b/shared-rope --out "$OUT/sweep.jsonl" > "$OUT/sweep.log" 2>&1 || log "followups: sweep exit $?"
    timeout "$(budget 150)" "$PY" bench/finetune.py profile 2>&1 | grep -v -i warn >> "$log"
}

# ---- scale (issue 18): the Llama-3.2-1B shape on 1 then 2 GPUs ----------------------------------------------------
part_scale1b() {
    timeout "$PART_TIMEOUT" "$PY" -m bench.scale all --parts llama1b --gguf "$MODEL_GGUF" --data "$(kit .carry_data)" \
        --out "$OUT" 2>&1 | tail -40 | tee "$OUT/scale1b.log"
}

# ---- (a) the real model, the packaged gpu recipe on 2 GPUs ------------------------------------------------------
part_flow() {
    local mc args
    mc=$(kit .carry_mc)
    args=(--eval-text "$(wikitext)" --mc-tasks all --mc-data-dir "$mc" --needle --name smollm2-gpu-flow)
    if [[ $TINY == 1 ]]; then  # conversion only, tiny budgets
        args+=(--recipe none --calib-tokens 1024 --eval-tokens 1024 --mc-limit 2 --needle-lengths 256 --kv-rank 8)
        MHA2MLA_GPUS=1
    else
        args+=(--recipe gpu --eval-tokens "${EVAL_TOKENS:-65536}" ${FINETUNE_TOKENS:+--finetune-tokens "$FINETUNE_TOKENS"}
               ${NEEDLE_LENGTHS:+--needle-lengths "$NEEDLE_LENGTHS"})
        [[ ${MC_LIMIT:-100} == all ]] || args+=(--mc-limit "${MC_LIMIT:-100}")
        [[ -s $MODEL_GGUF ]] || { log "no model at $MODEL_GGUF: carry .carry_ma and .carry_mb first"; return 1; }
        MHA2MLA_GPUS=2
    fi
    export MHA2MLA_GPUS
    run_part flow "$MODEL_GGUF" "${args[@]}"
}

# ---- (b) a random Llama-3-8B shape, conversion only, on 1 GPU ---------------------------------------------------
part_convert8b() {
    local dir=$KIT/llama3-8b-random start
    [[ $TINY == 1 ]] && dir=$RUNS/llama-tiny-random
    if [[ ! -f $dir/config.json ]]; then
        start=$(date +%s)
        rm -rf "$dir.partial"  # written whole, then renamed: a cut-off write is never reused
        CUDA_VISIBLE_DEVICES=0 "$PY" - "$dir.partial" "$MODEL_GGUF" "$TINY" <<'EOF' 2>&1 | tee -a "$OUT/convert8b.log"
import sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from bench.shapes import LLAMA_3_8B
from mha2mla_core import load_model

path, gguf, tiny = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
shape = dict(LLAMA_3_8B)
if tiny:
    shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
start = time.perf_counter()
tokenizer = load_model(gguf)[1]  # the real model's tokenizer, as bench/scale.py saves its random shapes
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(LlamaConfig(**shape, dtype="bfloat16")).eval()
init_s = time.perf_counter() - start
model.save_pretrained(path)  # safetensors, bf16
tokenizer.save_pretrained(path)
params = sum(p.numel() for p in model.parameters())
print(f"random Llama-3-8B shape{' (tiny)' if tiny else ''}: {params / 1e9:.2f} B params, bf16, init {init_s:.0f} s, "
      f"saved to {path} in {time.perf_counter() - start - init_s:.0f} s", flush=True)
EOF
        [[ ${PIPESTATUS[0]} == 0 ]] || { log "writing the random model failed"; return 1; }
        mv "$dir.partial" "$dir"
        log "random model written to $dir in $(( $(date +%s) - start )) s"
    else
        log "reusing the random model at $dir"
    fi
    local args=(--recipe none --calib-tokens "${CALIB_TOKENS_8B:-8192}" --eval-text "$(wikitext)"
                --eval-tokens "${EVAL_TOKENS_8B:-4096}" --name llama3-8b-random-mla)
    [[ ${CHECK_8B:-0} == 1 ]] || args+=(--no-check)
    [[ $TINY == 1 ]] && args=(--recipe none --calib-tokens 1024 --eval-text "$(wikitext)" --eval-tokens 1024
                              --name llama-tiny-random-mla)
    CUDA_VISIBLE_DEVICES=0 MHA2MLA_GPUS=1 run_part convert8b "$dir" "${args[@]}"
}

# ---- main ---------------------------------------------------------------------------------------------------------
log "mode $MODE; repo $REPO; kit $KIT; out $OUT; tiny $TINY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a "$OUT/pipeline.log"
stage
[[ $MODE == stage ]] && { preflight; exit 0; }
preflight
status=0
case $MODE in
    flow) part_flow || status=$? ;;
    convert8b) part_convert8b || status=$? ;;
    all) part_flow || status=$?; part_convert8b || status=$? ;;
    speed) part_speed || status=$? ;;
    scale1b) part_scale1b || status=$? ;;
    quality)  # VARIANTS on GPU 0, VARIANTS_GPU1 (optional) on GPU 1 at the same time
        CUDA_VISIBLE_DEVICES=0 part_quality "${VARIANTS:?set VARIANTS to bench/finetune.py variant names}" gpu0 &
        quality_pid=$!
        [[ -z ${VARIANTS_GPU1:-} ]] || CUDA_VISIBLE_DEVICES=1 part_quality "$VARIANTS_GPU1" gpu1 || status=$?
        [[ ${FOLLOWUPS_GPU1:-0} == 1 ]] && { CUDA_VISIBLE_DEVICES=1 part_followups || status=$?; }
        wait "$quality_pid" || status=$? ;;
    8b+speed)  # two GPUs, two parts at once: the 8B conversion on GPU 0, the speed part on GPU 1
        part_convert8b & convert_pid=$!
        CUDA_VISIBLE_DEVICES=1 part_speed || status=$?
        wait "$convert_pid" || status=$? ;;
    *) echo "usage: bash bench/gpu_pipeline.sh stage|flow|convert8b|all|speed|scale1b|quality|8b+speed" >&2; exit 2 ;;
esac
df -h "$RUNS" "$KIT" 2>/dev/null | tee -a "$OUT/pipeline.log"
log "done: mode $MODE, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
