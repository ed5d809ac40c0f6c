"""FlashInfer's MLA decode as a peer of our Triton latent kernel (issue 17, item 5), on the same data in the same run.

    PYTHONPATH=/tmp/site:. python3 -m bench.peer_flashinfer --out $OUT/peer.jsonl     # needs a CUDA GPU
    python -m bench.peer_flashinfer --shapes deepseek/h16 --points 16x16384 --backends fa3   # a subset

FlashInfer (`flashinfer-python` 0.6.18.post1, a pure-Python wheel with its CUDA sources, CUTLASS and CCCL headers;
its kernels are JIT-built with the machine's nvcc on first use, bound through TVM FFI, so no torch C++ ABI is
involved) goes to an offline GPU machine as wheels in the ignored folder .carry_fi/ (it and apache-tvm-ffi, ~21 MB):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry_fi/*.whl
    PYTHONPATH=/tmp/site:. python3 -m bench.peer_flashinfer --out $OUT/peer.jsonl

Its other requirements are unused here (cudnn frontend, CUTLASS DSL, cuda-tile, nccl4py: other kernels, imported
lazily) or already on the machine (jinja2, ninja, numpy, einops, nvidia-ml-py, ...).
For each shape, batch B and context T (all rows full, one query token per row, bf16):

  `mla` = our `latent_decode_attention` on c_kv (B, 1, T, Rc), k_pe (B, 1, T, Dr), q_lat (B, H, Rc), q_pe (B, H, Dr);
  `fi_<backend>` = `flashinfer.mla.BatchMLAPagedAttentionWrapper` (backend fa3 = the Hopper kernel FlashInfer's "auto"
      picks on sm_90, fa2 = its portable one) on the same tensors viewed as pages: ckv (B * T / P, P, Rc),
      kpe (B * T / P, P, Dr), page size P (`--page-size`), row b owning pages b * T / P .. (b + 1) * T / P - 1 (or a
      random permutation of all pages with `--shuffle-pages`, the data moved to match); planned with use_cuda_graph
      so its run() is captured like ours;
  `sdpa` = torch SDPA on the expanded, original-style attention (DeepSeek: MHA, K 192 = 128 + 64 dims, V 128 dims;
      SmolLM2: GQA 9 / 3 heads of 64), only where its K/V fit `--sdpa-max-gb`; the peer that always runs.

For shapes of more than 16 heads ours is also timed at each `--head-blocks` cap on the heads one program takes
(`LaunchConfig.max_block_h`; default 16, 32, 64) and warps per program (`--head-block-warps`, default 4 and 8),
the sweep behind the default's choice.

Times are bench/decode.py's `time_ms` (CUDA-graph replays, L2 flushed before every call); GB/s = the cache bytes each
method reads (c_kv + k_pe for both latent kernels, K + V for SDPA) / time; %bw against bench/decode.py's
`peak_bandwidth_gbs` (datasheet HBM bandwidth by device name). Each FlashInfer output is checked against ours
(max abs error, and that over max |ours|) and printed. The JIT build of each FlashInfer module runs first in a child
process under `--jit-timeout` (killed with its compilers if it runs past it); its time is printed. The build cache is
build/flashinfer/ in the repo (FLASHINFER_WORKSPACE_BASE, TVM_FFI_CACHE_DIR), so a second run on a warm machine
skips the build. If FlashInfer cannot be imported, built or run for a shape, the reason is printed and written to
the JSON lines, and the rows keep ours and SDPA. FlashInfer's MLA kernels are written for DeepSeek's 512 + 64;
the SmolLM2 shape (latent 48, rope 24) is tried last, so that a failure there cannot spoil the DeepSeek rows.
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", str(REPO / "build" / "flashinfer"))
os.environ.setdefault("TVM_FFI_CACHE_DIR", str(REPO / "build" / "flashinfer" / "tvm-ffi"))

POINTS = ((1, 4096), (16, 16384), (64, 32768))  # (B, T)
PAGE_SIZE = 64
BACKENDS = ("fa3", "fa2")
WORKSPACE_BYTES = 512 << 20  # FlashInfer's float workspace (split-kv partial outputs); 128 MB is its recommendation
SDPA_MAX_GB = 48.0
JIT_TIMEOUT_S = 480
AGREE_REL = 2e-2  # FlashInfer's output agrees with ours when max |diff| <= this x max |ours| (both bf16 outputs)
REF_MAX_TOKENS = 16 * 4096  # also check both against the plain-torch reference up to B * T of this


@dataclass(frozen=True)
class PeerShape:
    """Latent layout (H query heads, latent Rc, rope Dr; one latent and one rope head shared by all query heads) and
    the original attention SDPA stands for (Hkv heads, K dims Dk, V dims Dv); scale = 1 / sqrt(D + Dr)."""

    name: str
    H: int
    Rc: int
    Dr: int
    D: int  # the no-rope query/key dims of the original head (DeepSeek's qk_nope_head_dim)
    sdpa_Hkv: int
    sdpa_Dk: int
    sdpa_Dv: int

    @property
    def scale(self) -> float:
        return 1 / math.sqrt(self.D + self.Dr)


SHAPES = (
    PeerShape("deepseek/h16", H=16, Rc=512, Dr=64, D=128, sdpa_Hkv=16, sdpa_Dk=192, sdpa_Dv=128),
    PeerShape("deepseek/h128", H=128, Rc=512, Dr=64, D=128, sdpa_Hkv=128, sdpa_Dk=192, sdpa_Dv=128),
    # bench/decode.py's smollm2-135m/shared-rope: one 48-dim latent and one 24-dim rope key for 9 heads; SDPA on the
    # original GQA (9 query / 3 K/V heads of 64); scale as bench/decode.py's 1 / sqrt(D + Dr)
    PeerShape("smollm2-135m/shared-rope", H=9, Rc=48, Dr=24, D=64, sdpa_Hkv=3, sdpa_Dk=64, sdpa_Dv=64),
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- our layout -> FlashInfer's paged layout (pure torch; checked on CPU in tests/test_peer_flashinfer.py) ---------
def paged_layout(c_kv: torch.Tensor, k_pe: torch.Tensor, page_size: int, perm: torch.Tensor | None = None) -> dict:
    """Our c_kv (B, 1, T, Rc), k_pe (B, 1, T, Dr) as FlashInfer's MLA page cache, every row full.

    Returns ckv (N, P, Rc), kpe (N, P, Dr) with N = B * T / P pages, and the int32 plan arrays qo_indptr (B + 1,)
    = 0..B (one query token per row), kv_indptr (B + 1,) = b * T / P, kv_indices (N,), kv_len (B,) = T. Without perm,
    page j of row b is page b * T / P + j of a view of our tensors (no copy); with perm (a permutation of N), it is
    stored at page perm[b * T / P + j] of a copy, and kv_indices lists those slots."""
    B, Hc, T, Rc = c_kv.shape
    Hr, Dr = k_pe.shape[1], k_pe.shape[3]
    if Hc != 1 or Hr != 1:
        raise ValueError(f"FlashInfer's MLA cache has one latent and one rope head; got Hc={Hc}, rope heads={Hr}")
    if T % page_size:
        raise ValueError(f"T={T} is not a multiple of the page size {page_size}")
    n = T // page_size
    ckv = c_kv.reshape(B * n, page_size, Rc)  # (N, P, Rc): a view when c_kv is contiguous
    kpe = k_pe.reshape(B * n, page_size, Dr)  # (N, P, Dr)
    kv_indices = torch.arange(B * n, dtype=torch.int32)
    if perm is not None:
        ckv_p, kpe_p = torch.empty_like(ckv), torch.empty_like(kpe)
        ckv_p[perm.to(ckv.device)] = ckv
        kpe_p[perm.to(kpe.device)] = kpe
        ckv, kpe, kv_indices = ckv_p, kpe_p, perm.to(torch.int32)
    return {
        "ckv": ckv,
        "kpe": kpe,
        "qo_indptr": torch.arange(B + 1, dtype=torch.int32),
        "kv_indptr": torch.arange(B + 1, dtype=torch.int32) * n,
        "kv_indices": kv_indices,
        "kv_len": torch.full((B,), T, dtype=torch.int32),
    }


def paged_reference(q_nope, q_pe, ckv, kpe, kv_indptr, kv_indices, kv_len, scale: float) -> torch.Tensor:
    """Plain-torch MLA decode in FlashInfer's paged layout: q_nope (B, H, Rc), q_pe (B, H, Dr), ckv (N, P, Rc),
    kpe (N, P, Dr) -> (B, H, Rc) = softmax(scale * (q_nope.ckv + q_pe.kpe)) @ ckv over each row's first kv_len tokens."""
    out = []
    for b in range(q_nope.shape[0]):
        pages = kv_indices[int(kv_indptr[b]) : int(kv_indptr[b + 1])].long()
        L = int(kv_len[b])
        c = ckv[pages].flatten(0, 1)[:L].float()  # (L, Rc)
        k = kpe[pages].flatten(0, 1)[:L].float()  # (L, Dr)
        s = scale * (q_nope[b].float() @ c.T + q_pe[b].float() @ k.T)  # (H, L)
        out.append(torch.softmax(s, dim=-1) @ c)  # (H, Rc)
    return torch.stack(out).to(q_nope.dtype)


def parse_point(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


# ---- FlashInfer ----------------------------------------------------------------------------------------------------
def import_flashinfer():
    """(module, None) or (None, the reason it cannot be imported)."""
    try:
        import flashinfer  # noqa: PLC0415
        from flashinfer.mla import BatchMLAPagedAttentionWrapper  # noqa: PLC0415, F401
        import tvm_ffi  # noqa: PLC0415, F401
    except Exception as e:  # noqa: BLE001 - any failure is the reason to report
        return None, f"import flashinfer failed: {type(e).__name__}: {e}"
    return flashinfer, None


def prepare_jit_env() -> list[str]:
    """Point FlashInfer's JIT at a whole toolkit and make its link line (-lcudart -lcuda, searched in
    $CUDA_HOME/lib64 and lib64/stubs) resolvable; returns what was changed. FlashInfer takes CUDA_HOME, else the
    directory above `which nvcc`: /usr/local for a /usr/local/bin/nvcc, which has no lib64. Where no unversioned
    libcuda.so / libcudart.so is on the link path, build/flashinfer/ldstub/ gets links to the versioned libraries
    (the driver's libcuda.so.1; the toolkit's or torch's libcudart.so.*) and FLASHINFER_EXTRA_LDFLAGS -L's it."""
    import glob  # noqa: PLC0415

    notes = []
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        for home in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
            if Path(home, "bin", "nvcc").exists():
                os.environ["CUDA_HOME"] = home
                notes.append(f"CUDA_HOME={home}")
                break
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    system = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64",
              "/usr/local/nvidia/lib", "/usr/lib/wsl/lib", f"{home}/compat"]  # fmt: skip
    search = [f"{home}/lib64", f"{home}/lib64/stubs", f"{home}/lib", f"{home}/targets/x86_64-linux/lib", *system]
    search += os.environ.get("LIBRARY_PATH", "").split(":") + os.environ.get("LD_LIBRARY_PATH", "").split(":")
    search = [d for d in dict.fromkeys(search) if d]
    torch_libs = sorted(glob.glob(str(Path(torch.__file__).parent.parent / "nvidia" / "**" / "libcudart.so.*"), recursive=True))
    try:
        with open("/proc/self/maps") as f:
            loaded = list(dict.fromkeys(ln.split()[-1] for ln in f if ".so" in ln and ln.split()[-1].startswith("/")))
    except OSError:
        loaded = []
    stub = REPO / "build" / "flashinfer" / "ldstub"
    linked = False
    for so in ("libcudart.so", "libcuda.so"):
        if any(Path(d, so).exists() for d in search):
            continue
        found = [p for p in loaded if Path(p).name.startswith(f"{so}.")]  # what this process (torch) has loaded
        found += [p for d in search for p in sorted(glob.glob(f"{d}/{so}.*"))]
        if so == "libcudart.so":
            found += torch_libs
        if not found:
            notes.append(f"no {so} or {so}.* found in {search}: the JIT link may fail")
            continue
        stub.mkdir(parents=True, exist_ok=True)
        link = stub / so
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
        notes.append(f"{link} -> {found[0]}")
        linked = True
    if linked and "FLASHINFER_EXTRA_LDFLAGS" not in os.environ:
        os.environ["FLASHINFER_EXTRA_LDFLAGS"] = f"-L{stub}"
        notes.append(f"FLASHINFER_EXTRA_LDFLAGS=-L{stub}")
    return notes


def flashinfer_env() -> dict:
    """What the JIT build will use, for the log."""
    env = {}
    try:
        from flashinfer.jit import cpp_ext  # noqa: PLC0415

        env["cuda_home"] = cpp_ext.get_cuda_path()
        env["nvcc_version"] = str(cpp_ext.get_cuda_version())
    except Exception as e:  # noqa: BLE001
        env["env_error"] = f"{type(e).__name__}: {e}"
    env["workspace"] = os.environ["FLASHINFER_WORKSPACE_BASE"]
    return env


class FlashInferMLA:
    """A planned BatchMLAPagedAttentionWrapper for one (shape, B, T) on our tensors; call() runs one decode step."""

    def __init__(self, backend: str, q_lat, q_pe, c_kv, k_pe, scale: float, page_size: int, perm=None):
        import tvm_ffi  # noqa: PLC0415
        from flashinfer.mla import BatchMLAPagedAttentionWrapper  # noqa: PLC0415

        self._tvm_ffi = tvm_ffi
        layout = paged_layout(c_kv, k_pe, page_size, perm)
        dev = c_kv.device
        bufs = {k: layout[k].to(dev) for k in ("qo_indptr", "kv_indptr", "kv_indices", "kv_len")}
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self.wrapper = BatchMLAPagedAttentionWrapper(
            self.workspace, use_cuda_graph=True, qo_indptr=bufs["qo_indptr"], kv_indptr=bufs["kv_indptr"],
            kv_indices=bufs["kv_indices"], kv_len_arr=bufs["kv_len"], backend=backend,
        )  # fmt: skip
        H, Rc, Dr = q_lat.shape[1], c_kv.shape[3], k_pe.shape[3]
        self.wrapper.plan(
            bufs["qo_indptr"], bufs["kv_indptr"], bufs["kv_indices"], bufs["kv_len"], H, Rc, Dr, page_size,
            False, scale, q_lat.dtype, c_kv.dtype,
        )  # fmt: skip
        self.q_lat, self.q_pe, self.ckv, self.kpe = q_lat, q_pe, layout["ckv"], layout["kpe"]
        self.out = torch.empty_like(q_lat)  # (B, H, Rc)

    def __call__(self) -> torch.Tensor:
        # the FFI stream follows torch's current one, so that a CUDA-graph capture takes the launch
        with self._tvm_ffi.use_torch_stream():
            self.wrapper.run(self.q_lat, self.q_pe, self.ckv, self.kpe, out=self.out)
        return self.out


def warm_jit(backend: str, H: int, Rc: int, Dr: int, page_size: int) -> None:
    """Child process: build (or load) the module on a one-page problem and run it once."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q_lat = torch.randn(1, H, Rc, device="cuda", dtype=torch.bfloat16, generator=g)
    q_pe = torch.randn(1, H, Dr, device="cuda", dtype=torch.bfloat16, generator=g)
    c_kv = torch.randn(1, 1, page_size, Rc, device="cuda", dtype=torch.bfloat16, generator=g)
    k_pe = torch.randn(1, 1, page_size, Dr, device="cuda", dtype=torch.bfloat16, generator=g)
    FlashInferMLA(backend, q_lat, q_pe, c_kv, k_pe, 0.1, page_size)()
    torch.cuda.synchronize()


def build_in_child(backend: str, s: PeerShape, page_size: int, timeout_s: float) -> tuple[bool, str, float]:
    """Build FlashInfer's module for (backend, shape) in a child process under a timeout: (ok, reason, seconds)."""
    cmd = [sys.executable, "-m", "bench.peer_flashinfer", "--warm-jit", backend, str(s.H), str(s.Rc), str(s.Dr),
           "--page-size", str(page_size)]  # fmt: skip
    log(f"  JIT: building/loading FlashInfer MLA {backend} for ckv {s.Rc}, kpe {s.Dr} (timeout {timeout_s:.0f} s) ...")
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's own process group: ninja and nvcc go with it
        child.communicate()
        return False, f"JIT build ran past --jit-timeout {timeout_s:.0f} s", time.perf_counter() - t0
    secs = time.perf_counter() - t0
    if child.returncode != 0:
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        error_lines = list(dict.fromkeys(ln for ln in lines if "error:" in ln.lower()))
        shown = "\n".join(error_lines[:8] + ["..."] + lines[-12:])
        log(f"  JIT: {backend} failed after {secs:.0f} s; the child's error lines and last lines:\n{shown}")
        first_error = error_lines[0] if error_lines else ""
        why = f"build/run failed (rc {child.returncode}): {lines[-1] if lines else ''}"
        if first_error and first_error != (lines[-1] if lines else ""):
            why += f"; first error line: {first_error}"
        return False, why[:2000], secs
    log(f"  JIT: {backend} ready in {secs:.1f} s")
    return True, "", secs


# ---- timing --------------------------------------------------------------------------------------------------------
def time_sdpa_expanded(s: PeerShape, B: int, T: int) -> tuple[float, int]:
    """SDPA on the original-style cache: q (B, H, 1, Dk), K (B, Hkv, T, Dk), V (B, Hkv, T, Dv)."""
    from bench.decode import time_ms  # noqa: PLC0415

    q = torch.randn(B, s.H, 1, s.sdpa_Dk, device="cuda", dtype=torch.bfloat16)  # (B, H, 1, Dk)
    k = torch.randn(B, s.sdpa_Hkv, T, s.sdpa_Dk, device="cuda", dtype=torch.bfloat16)  # (B, Hkv, T, Dk)
    v = torch.randn(B, s.sdpa_Hkv, T, s.sdpa_Dv, device="cuda", dtype=torch.bfloat16)  # (B, Hkv, T, Dv)
    gqa = s.sdpa_Hkv != s.H
    ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
    nbytes = k.nbytes + v.nbytes
    del q, k, v
    return ms, nbytes


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    err = (out.float() - ref.float()).abs().max().item()
    return err, err / max(ref.float().abs().max().item(), 1e-30)


def bench_point(s: PeerShape, B: int, T: int, args, fi_ok: dict, peak_gbs: float) -> dict:
    from bench.decode import eager_ms, time_ms  # noqa: PLC0415
    from mha2mla_core.kernels import latent_decode_attention, latent_decode_attention_reference  # noqa: PLC0415

    row = {"shape": s.name, "H": s.H, "Rc": s.Rc, "Dr": s.Dr, "B": B, "T": T, "page_size": args.page_size}
    sdpa_bytes = B * s.sdpa_Hkv * T * (s.sdpa_Dk + s.sdpa_Dv) * 2
    if args.no_sdpa:
        row["sdpa_skipped"] = "--no-sdpa"
    elif sdpa_bytes > args.sdpa_max_gb * 1e9:
        row["sdpa_skipped"] = f"K/V {sdpa_bytes / 1e9:.0f} GB > --sdpa-max-gb {args.sdpa_max_gb:.0f}"
    else:
        row["sdpa_ms"], row["sdpa_bytes"] = time_sdpa_expanded(s, B, T)
        torch.cuda.empty_cache()

    g = torch.Generator(device="cuda").manual_seed(B * 1_000_003 + T)
    q_lat = torch.randn(B, s.H, s.Rc, device="cuda", dtype=torch.bfloat16, generator=g)  # (B, H, Rc)
    q_pe = torch.randn(B, s.H, s.Dr, device="cuda", dtype=torch.bfloat16, generator=g)  # (B, H, Dr)
    c_kv = torch.randn(B, 1, T, s.Rc, device="cuda", dtype=torch.bfloat16, generator=g)  # (B, 1, T, Rc)
    k_pe = torch.randn(B, 1, T, s.Dr, device="cuda", dtype=torch.bfloat16, generator=g)  # (B, 1, T, Dr)
    scale = s.scale
    ours = latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale)  # (B, H, Rc)
    row["mla_ms"] = time_ms(lambda: latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale))
    row["mla_bytes"] = c_kv.nbytes + k_pe.nbytes
    if args.head_blocks and s.H > 16:  # ours at other caps on the heads per program: the sweep behind the default
        from mha2mla_core.kernels import triton_latent  # noqa: PLC0415 - imports triton

        default = triton_latent.default_config(q_lat, c_kv, k_pe)
        row["mla_block_h"] = triton_latent.head_blocks(s.H, s.Rc, default)[0]
        for n in args.head_blocks:
            for warps in args.head_block_warps:
                cfg = replace(default, max_block_h=n, num_warps=warps)
                name = f"mla_hb{n}" + ("" if warps == default.num_warps else f"w{warps}")
                row[f"{name}_ms"] = time_ms(lambda: triton_latent.decode(q_lat, q_pe, c_kv, k_pe, scale, cfg=cfg))  # noqa: B023
    if B * T <= REF_MAX_TOKENS:
        ref = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale)
        row["mla_vs_ref_abs"], row["mla_vs_ref_rel"] = errors(ours, ref)

    perm = None
    if args.shuffle_pages:
        perm = torch.randperm(B * T // args.page_size, generator=torch.Generator().manual_seed(T))
    for backend in args.backends:
        key = f"fi_{backend}"
        if fi_ok.get((backend, s.name)) is not True:
            row[f"{key}_error"] = fi_ok.get((backend, s.name)) or "not built"
            continue
        try:
            fi = FlashInferMLA(backend, q_lat, q_pe, c_kv, k_pe, scale, args.page_size, perm)
            out = fi().clone()
            torch.cuda.synchronize()
            row[f"{key}_abs_err"], row[f"{key}_rel_err"] = errors(out, ours)
            row[f"{key}_agrees"] = row[f"{key}_rel_err"] <= AGREE_REL
            if not row[f"{key}_agrees"]:
                log(f"  {s.name} B={B} T={T} {backend}: output differs from ours, max abs error "
                    f"{row[f'{key}_abs_err']:.3g} = {row[f'{key}_rel_err']:.3g} of max |ours| (> {AGREE_REL})")  # fmt: skip
            try:
                row[f"{key}_ms"] = time_ms(fi)
                row[f"{key}_timing"] = "cuda graph"
            except Exception as e:  # noqa: BLE001 - a launch the capture refuses: time it eagerly (with launch cost)
                torch.cuda.synchronize()
                row[f"{key}_ms"] = eager_ms(fi)
                row[f"{key}_timing"] = f"eager, launch overhead included (graph capture failed: {type(e).__name__}: {e})"[:500]
                log(f"  {s.name} B={B} T={T} {backend}: {row[f'{key}_timing']}")
            row[f"{key}_bytes"] = row["mla_bytes"]
            del fi, out
        except Exception as e:  # noqa: BLE001 - report and keep the row
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"  {s.name} B={B} T={T} {backend}: {row[f'{key}_error']}")
        torch.cuda.empty_cache()
    del q_lat, q_pe, c_kv, k_pe, ours
    torch.cuda.empty_cache()

    swept = [k.removesuffix("_ms") for k in row if k.startswith("mla_hb") and k.endswith("_ms")]
    for name in swept:
        row[f"{name}_bytes"] = row["mla_bytes"]
    for name in ["sdpa", "mla"] + [f"fi_{b}" for b in args.backends] + swept:
        if f"{name}_ms" in row:
            row[f"{name}_gbs"] = row[f"{name}_bytes"] / row[f"{name}_ms"] / 1e6
            row[f"{name}_pct_bw"] = 100 * row[f"{name}_gbs"] / peak_gbs
    for b in args.backends:
        if f"fi_{b}_ms" in row:
            row[f"fi_{b}_over_mla"] = row[f"fi_{b}_ms"] / row["mla_ms"]  # > 1: ours is faster
    if "sdpa_ms" in row:
        row["sdpa_over_mla"] = row["sdpa_ms"] / row["mla_ms"]
    return row


def _cell(r: dict, name: str) -> str:
    if f"{name}_ms" not in r:
        return "-"
    return f"{1e3 * r[f'{name}_ms']:.1f} ({r[f'{name}_gbs']:.0f}, {r[f'{name}_pct_bw']:.0f}%)"


def print_table(rows: list[dict], backends: list[str], peak_gbs: float, peak_source: str) -> None:
    log(f"\nPer-layer MLA decode step, bf16, one query token per row; us (GB/s, %bw of {peak_gbs:.0f} GB/s, "
        f"{peak_source}); FlashInfer / ours: > 1 means ours is faster")  # fmt: skip
    head = "| shape | B | T | ours us (GB/s, %bw) |"
    for b in backends:
        head += f" FlashInfer {b} us (GB/s, %bw) | {b} / ours | {b} err abs (rel) |"
    head += " SDPA orig us (GB/s, %bw) | SDPA / ours |"
    log(head)
    log("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = f"| {r['shape']} | {r['B']} | {r['T'] // 1024}k | {_cell(r, 'mla')} |"
        for b in backends:
            k = f"fi_{b}"
            if f"{k}_ms" in r:
                bad = "" if r[f"{k}_agrees"] else " DIFFERS"
                line += f" {_cell(r, k)} | {r[f'{k}_over_mla']:.2f} | {r[f'{k}_abs_err']:.1e} ({r[f'{k}_rel_err']:.1e}){bad} |"
            else:
                line += " failed: see below | - | - |" if f"{k}_error" in r else " - | - | - |"
        line += f" {_cell(r, 'sdpa')} | {r['sdpa_over_mla']:.1f} |" if "sdpa_ms" in r else " - | - |"
        log(line)
    for r in rows:
        sweep = [k[len("mla_hb"):-len("_ms")] for k in r if k.startswith("mla_hb") and k.endswith("_ms")]
        if sweep:
            cells = ", ".join(f"{n.replace('w', ' heads, ', 1) + ' warps' if 'w' in n else n + ' heads'} "
                              f"{_cell(r, f'mla_hb{n}')}" for n in sweep)
            log(f"ours by heads per program, {r['shape']} B={r['B']} T={r['T'] // 1024}k (default {r['mla_block_h']}): {cells}")
    reasons = {}
    for r in rows:
        for b in backends:
            if f"fi_{b}_error" in r:
                reasons.setdefault((r["shape"], b), r[f"fi_{b}_error"])
    for (shape, b), why in reasons.items():
        log(f"FlashInfer {b} on {shape}: {why}")


def main(args: argparse.Namespace) -> None:
    from bench.decode import copy_bandwidth_gbs, peak_bandwidth_gbs  # noqa: PLC0415

    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    if args.shapes and len(shapes) != len(set(args.shapes)):
        raise SystemExit(f"--shapes {args.shapes}: known shapes are {[s.name for s in SHAPES]}")
    shapes.sort(key=lambda s: (s.Rc, s.Dr) != (512, 64))  # DeepSeek's shapes first, the ones FlashInfer may reject last
    points = [parse_point(p) for p in args.points]
    command = "python " + shlex.join(sys.argv)
    copy_gbs = copy_bandwidth_gbs()
    peak_gbs, peak_source = peak_bandwidth_gbs(copy_gbs)
    header = {"device": torch.cuda.get_device_name(), "command": command, "copy_gbs": copy_gbs, "peak_gbs": peak_gbs,
              "torch": torch.__version__, "torch_cuda": torch.version.cuda}  # fmt: skip
    log(f"{header['device']}: copy bandwidth {copy_gbs:.0f} GB/s; peak {peak_gbs:.0f} GB/s ({peak_source})")
    log(f"command: {command}")

    header["jit_env_notes"] = prepare_jit_env()  # before flashinfer reads CUDA_HOME; the JIT children inherit it
    for note in header["jit_env_notes"]:
        log(f"JIT environment: {note}")
    fi, why = import_flashinfer()
    header["flashinfer"] = fi.__version__ if fi else None
    if fi is None:
        header["flashinfer_error"] = why
        log(f"FlashInfer unavailable, SDPA stays the peer: {why}")
    else:
        header.update(flashinfer_env())
        log(f"flashinfer {fi.__version__} from {Path(fi.__file__).parent}; {flashinfer_env()}")
    fi_ok: dict = {}  # (backend, shape name) -> True or the reason it is not there
    out_f = open(args.out, "w") if args.out else None  # noqa: SIM115 - rows are written as they come
    if out_f:
        out_f.write(json.dumps({**header, "kind": "header"}) + "\n")
        out_f.flush()
    rows = []
    for s in shapes:
        log(f"\n== {s.name}: H {s.H}, latent {s.Rc}, rope {s.Dr}, scale 1/sqrt({s.D + s.Dr})")
        for backend in args.backends:
            if fi is None:
                fi_ok[(backend, s.name)] = why
                continue
            ok, reason, secs = build_in_child(backend, s, args.page_size, args.jit_timeout)
            fi_ok[(backend, s.name)] = True if ok else reason
            if out_f:
                out_f.write(json.dumps({**header, "kind": "jit", "shape": s.name, "backend": backend, "ok": ok,
                                        "seconds": secs, "error": reason}) + "\n")  # fmt: skip
                out_f.flush()
        for B, T in points:
            row = bench_point(s, B, T, args, fi_ok, peak_gbs)
            rows.append(row)
            log(json.dumps(row))
            if out_f:
                out_f.write(json.dumps({**header, "kind": "point", **row}) + "\n")
                out_f.flush()
    print_table(rows, args.backends, peak_gbs, peak_source)
    if out_f:
        out_f.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write a header, the JIT builds and the rows as JSON lines here")
    parser.add_argument("--shapes", nargs="*", help=f"a subset of {[s.name for s in SHAPES]}")
    parser.add_argument("--points", nargs="+", default=[f"{b}x{t}" for b, t in POINTS], help="BxT, e.g. 16x16384")
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS), help="FlashInfer MLA backends (fa3: sm_90 only)")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE)
    parser.add_argument("--shuffle-pages", action="store_true", help="place the pages at random slots of the cache")
    parser.add_argument("--jit-timeout", type=float, default=JIT_TIMEOUT_S, help="seconds for each module's build")
    parser.add_argument("--sdpa-max-gb", type=float, default=SDPA_MAX_GB, help="skip SDPA where its K/V exceed this")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--head-blocks", type=int, nargs="*", default=[16, 32, 64],
                        help="also time ours with at most this many heads per program, for shapes of more than 16 heads")
    parser.add_argument("--head-block-warps", type=int, nargs="+", default=[4, 8],
                        help="... at each of these warps per program (the default config's 4 is named without a suffix)")
    parser.add_argument("--warm-jit", nargs=4, metavar=("BACKEND", "H", "RC", "DR"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.warm_jit:
        warm_jit(a.warm_jit[0], *map(int, a.warm_jit[1:]), page_size=a.page_size)
    else:
        main(a)
