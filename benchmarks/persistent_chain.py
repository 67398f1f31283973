"""A persistent chain of decode GEMVs: one kernel, one program per SM, grid barriers between phases.

Why: the decode step launches one kernel per sub-layer (63 at medium). Under PDL each kernel starts
streaming its first weight tile early, yet on an H200 every FP8 GEMV still costs ~2.5-3 us beyond its
bytes on the step's critical path (BF16 ~1 us), the same in every layer, so an FP8 step is only 0.95x
a BF16 one while its floor is 0.6x. A persistent kernel (Hazy Research's "No Bubbles", Mirage MPK:
~1.25-1.3x the floor at batch 1) replaces each kernel boundary by a grid barrier: an atomic arrival
and a spin on one L2 counter, with no launch, no grid drain and no PDL wait.

This module is the measurement that decides whether that design pays before the whole step moves into
it: the decode step's weight stream (per layer QKV, o_proj, FC13 + SwiGLU, FC2, then the LM head)
chained through one vector, as GEMV phases of one kernel. It reuses the per-tile math of the
one-kernel-per-GEMV path (gemv_math.py), so the two are compared on the same arithmetic;
benchmarks/persistent_probe.py times both on a GPU against the floor. Two tile engines:
  * "fma": CUDA-core multiply-adds, as linear_small_m's GEMV (FP8 weights converted per byte);
  * "dot": tl.dot with the weight tile as the 16-row M side and x as a zero-padded 16-column N side,
    operands fp16 for FP8 weights (one packed e4m3x2 -> f16x2 conversion per two bytes, mma.sync) or
    bf16: the conversion that bounds the FMA engine is halved, and the tensor cores add.

Barriers: program p adds 1 to a zeroed int32 counter (release, GPU scope) after its phase and spins
(acquire) until it reads P x (phases done). Every program must be resident at once: the grid is at
most one program per SM and each fits an SM alone. A spin gives up after MAX_SPINS reads and sets an
error flag, so a broken barrier yields a flagged result, never a hang. Buffers are distinct per layer,
so no program ever reads a line its L1 could hold from an earlier phase. Under Triton's interpreter,
whose programs run one after another, each phase is its own launch (BARRIER=False): the phases' code
is the same, so CPU tests check the math and the GPU run checks the barriers.

Measured on one H200 (dbda2f9, benchmarks/results/h200-persistent-probe-dbda2f9.json; the chain's vector then
vanished after a few layers, which changes no timing): a grid barrier costs 0.96 us (33 in 32.8 us), about what a
PDL kernel boundary costs. The same weight stream as linear_small_m launches took 196 us in BF16 (1.13x its floor)
and 208 us in FP8 (2.02x); the persistent kernel's best tiles 285 us (1.64x) and 309 us (3.0x), its "dot" engine
2.8-17x. As written it loses: a program fetches its tiles one after another, with nothing in flight across tiles
or across a barrier, while a PDL launch has its next kernel's first tiles in flight. What would have to change for
it to pay: each program's next tile (and the next phase's first) loaded before the current one's math and before
the barrier. Not pursued further: FP8's gap is in the GEMV itself (2x its floor as launches, BF16 1.13x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from collectives.communicator import INV_FP8_MAX, MIN_AMAX, quantize_fp8
from collectives.triton_support import INTERPRETED, tl, triton

FP8 = torch.float8_e4m3fn
PHASES_PER_LAYER = 4  # QKV, o_proj, FC13 + SwiGLU, FC2
MAX_SPINS = 1 << 22  # ~1-4 s of L2 round trips: far beyond any phase, short of a CI timeout
DOT_COLS = 16  # the zero-padded N side of the "dot" engine (tl.dot's smallest)

if triton is not None:
    from model.kernels import gemv_math as gm
    DOT_COLS_C = tl.constexpr(DOT_COLS)  # a kernel reads globals only as constexprs

    @triton.jit
    def grid_barrier(counter_ptr, target, err_ptr, MAX_SPINS_C: tl.constexpr):
        """Waits until `target` arrivals are counted at counter_ptr, this program's included; sets
        *err_ptr to 1 if it gave up. Stores before it are visible to every program after it."""
        tl.debug_barrier()  # every thread's stores issued before thread 0's release
        seen = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu") + 1
        spins = 0
        while (seen < target) & (spins < MAX_SPINS_C):
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if spins >= MAX_SPINS_C:
            tl.atomic_xchg(err_ptr, 1)
        tl.debug_barrier()

    @triton.jit
    def _fma_tile(x_ptr, w_ptr, ws_ptr, out_ptr, tile, N_OUT: tl.constexpr, K: tl.constexpr,
                  QUANT: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[tile] = f(x @ W[tile].T) on the CUDA cores (gemv_math's GEMV math, CVT 0)."""
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output rows of W
        col_ok = cols < N_OUT
        w_gate = w_ptr + cols.to(tl.int64)[:, None] * K  # (BLOCK_N, 1)
        w_up = w_gate + N_OUT * K  # SwiGLU: up rows N_OUT below the gate rows
        w_g, w_u = gm.first_chunk(w_gate, w_up, col_ok, 1, 0, K, SWIGLU, 0, BLOCK_K)
        g, u, xs = gm.gemv_sums(x_ptr, 1.0, x_ptr, w_gate, w_up, w_g, w_u, col_ok, 1, 0, K, K, False, QUANT,
                                SWIGLU, 0, BLOCK_N, BLOCK_K)
        y = gm.finish(g, u, xs, ws_ptr, cols, col_ok, N_OUT, QUANT, SWIGLU, 0)
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _dot_sums(x_ptr, w_rows, div, K: tl.constexpr, QUANT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N,) float32 sums W[rows] @ x (x quantized by `div` for FP8) on the tensor cores."""
        pad = tl.arange(0, DOT_COLS_C)[None, :] == 0  # (1, DOT_COLS): x is column 0 of the N side
        acc = tl.zeros((BLOCK_N, DOT_COLS_C), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + ks[None, :])  # (BLOCK_N, BLOCK_K)
            x = gm.load_x(x_ptr + ks, ks < K, 1.0, False)  # (BLOCK_K,) float32
            if QUANT:
                x = gm.quantize(x, div)
            x_cols = tl.where(pad, x[:, None], 0.0)  # (BLOCK_K, DOT_COLS)
            acc = tl.dot(w.to(DOT_DTYPE), x_cols.to(DOT_DTYPE), acc, input_precision="ieee")
        return tl.sum(tl.where(pad, acc, 0.0), axis=1)

    @triton.jit
    def _dot_tile(x_ptr, w_ptr, ws_ptr, out_ptr, tile, N_OUT: tl.constexpr, K: tl.constexpr,
                  QUANT: tl.constexpr, SWIGLU: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """out[tile] = f(x @ W[tile].T) on the tensor cores, the same epilogue as _fma_tile."""
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        xs, div = 1.0, 1.0
        if QUANT:
            xs, div = gm.x_scale(x_ptr, x_ptr, 1.0, K, False, QUANT, BLOCK_K)
        w_gate = w_ptr + cols.to(tl.int64)[:, None] * K
        g = _dot_sums(x_ptr, w_gate, div, K, QUANT, DOT_DTYPE, BLOCK_N, BLOCK_K)
        u = g
        if SWIGLU:
            u = _dot_sums(x_ptr, w_gate + N_OUT * K, div, K, QUANT, DOT_DTYPE, BLOCK_N, BLOCK_K)
        y = gm.finish(g, u, xs, ws_ptr, cols, col_ok, N_OUT, QUANT, SWIGLU, 0)
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _phase(x_ptr, w_ptr, ws_ptr, out_ptr, program, programs, N_OUT: tl.constexpr, K: tl.constexpr,
               QUANT: tl.constexpr, SWIGLU: tl.constexpr, DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One GEMV phase: this program's tiles (program, program + programs, ...) of W (N_OUT rows)."""
        for tile in range(program, tl.cdiv(N_OUT, BLOCK_N), programs):
            if DOT:
                _dot_tile(x_ptr, w_ptr, ws_ptr, out_ptr, tile, N_OUT, K, QUANT, SWIGLU, DOT_DTYPE, BLOCK_N, BLOCK_K)
            else:
                _fma_tile(x_ptr, w_ptr, ws_ptr, out_ptr, tile, N_OUT, K, QUANT, SWIGLU, BLOCK_N, BLOCK_K)

    @triton.jit
    def _chain_kernel(x_buf, qkv_buf, o_buf, act_buf, logits, w_qkv, s_qkv, w_o, s_o, w_up, s_up, w_down, s_down,
                      w_lm, s_lm, counter_ptr, err_ptr, phase_lo, phase_hi, n_layers,
                      H: tl.constexpr, QKV: tl.constexpr, INTER: tl.constexpr, VOCAB: tl.constexpr,
                      QUANT: tl.constexpr, LM_QUANT: tl.constexpr, DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      LM_DOT_DTYPE: tl.constexpr, BARRIER: tl.constexpr,
                      BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_UP: tl.constexpr, BN_DOWN: tl.constexpr,
                      BN_LM: tl.constexpr, BLOCK_K: tl.constexpr, MAX_SPINS_C: tl.constexpr):
        """Phases [phase_lo, phase_hi) of the chain, PHASES_PER_LAYER a layer, then the LM head:
        x_buf[l] -QKV-> qkv_buf[l]; its first H values -o_proj-> o_buf[l] -FC13+SwiGLU-> act_buf[l]
        -FC2-> x_buf[l + 1]; x_buf[n_layers] -LM head-> logits. Weights stacked per layer, K-contiguous."""
        program, programs = tl.program_id(0), tl.num_programs(0)
        for ph in range(phase_lo, phase_hi):
            layer = ph // 4  # int32 offsets: GemvChain checks every stacked weight has < 2^31 elements
            step = ph % 4
            if ph == 4 * n_layers:
                _phase(x_buf + layer * H, w_lm, s_lm, logits, program, programs, VOCAB, H, LM_QUANT, False, DOT,
                       LM_DOT_DTYPE, BN_LM, BLOCK_K)
            elif step == 0:
                _phase(x_buf + layer * H, w_qkv + layer * QKV * H, s_qkv + layer * QKV, qkv_buf + layer * QKV,
                       program, programs, QKV, H, QUANT, False, DOT, DOT_DTYPE, BN_QKV, BLOCK_K)
            elif step == 1:
                _phase(qkv_buf + layer * QKV, w_o + layer * H * H, s_o + layer * H, o_buf + layer * H, program,
                       programs, H, H, QUANT, False, DOT, DOT_DTYPE, BN_O, BLOCK_K)
            elif step == 2:
                _phase(o_buf + layer * H, w_up + layer * 2 * INTER * H, s_up + layer * 2 * INTER,
                       act_buf + layer * INTER, program, programs, INTER, H, QUANT, True, DOT, DOT_DTYPE, BN_UP,
                       BLOCK_K)
            else:
                _phase(act_buf + layer * INTER, w_down + layer * H * INTER, s_down + layer * H,
                       x_buf + (layer + 1) * H, program, programs, H, INTER, QUANT, False, DOT, DOT_DTYPE,
                       BN_DOWN, BLOCK_K)
            if BARRIER:
                grid_barrier(counter_ptr, (ph - phase_lo + 1) * programs, err_ptr, MAX_SPINS_C)


if triton is not None:
    @triton.jit
    def _barriers_kernel(counter_ptr, err_ptr, n_barriers, MAX_SPINS_C: tl.constexpr):
        """n_barriers grid barriers and nothing else: what one costs (benchmarks/persistent_probe.py)."""
        for i in range(n_barriers):
            grid_barrier(counter_ptr, (i + 1) * tl.num_programs(0), err_ptr, MAX_SPINS_C)


def barriers(counter: torch.Tensor, err: torch.Tensor, n_barriers: int, programs: int) -> None:
    """Zeroes the counter and launches n_barriers grid barriers over `programs` programs."""
    counter.zero_()
    _barriers_kernel[(programs,)](counter, err, n_barriers, MAX_SPINS_C=MAX_SPINS, num_warps=4)


def chain_weights(n_layers: int, hidden: int, qkv: int, inter: int, vocab: int, dtype: torch.dtype,
                  device, seed: int = 0, lm_dtype: torch.dtype | None = None, x: torch.Tensor | None = None) -> dict:
    """Random stacked weights of the chain (N(0, 1/K)), K-contiguous. FP8: e4m3 with one float32 scale
    per output row (the "channel" scheme); BF16: scales unused. lm_dtype: the LM head's (default dtype;
    the FP8 decode step keeps a BF16 LM head). SwiGLU squares the vector's scale each layer, so with `x`
    each layer's FC2 is rescaled (in float32) to give x's chain an RMS of 1 there: the vector neither
    vanishes nor overflows, and every phase's check compares real numbers."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {"qkv": (n_layers, qkv, hidden), "o": (n_layers, hidden, hidden), "up": (n_layers, 2 * inter, hidden),
              "down": (n_layers, hidden, inter), "lm": (vocab, hidden)}
    full = {name: torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / shape[-1] ** 0.5
            for name, shape in shapes.items()}
    if x is not None:
        h = x.float().to(device)
        for layer in range(n_layers):
            o = full["o"][layer] @ (full["qkv"][layer] @ h)[:hidden]
            gate, up = (full["up"][layer] @ o).chunk(2)
            out = full["down"][layer] @ (F.silu(gate) * up)
            full["down"][layer] /= out.pow(2).mean().sqrt()
            h = out / out.pow(2).mean().sqrt()
    weights = {}
    for name, w in full.items():
        if (lm_dtype or dtype if name == "lm" else dtype) == FP8:
            scale = w.abs().amax(-1) / 448.0  # (..., N)
            weights[name] = (w / scale[..., None]).to(FP8)
            weights["s_" + name] = scale
        else:
            weights[name] = w.to(torch.bfloat16 if dtype == FP8 else dtype)
            weights["s_" + name] = torch.ones(shapes[name][:-1], device=device)
    return weights


class GemvChain:
    """The chain's buffers and launches for one set of chain_weights: `run()` computes logits from
    x (hidden,), persistent (one launch, grid barriers) or one launch per phase (`barrier=False`:
    the interpreter's way, and a GPU check that the barriers change nothing)."""

    def __init__(self, weights: dict, engine: str = "fma", tiles: dict | None = None, programs: int | None = None,
                 num_warps: int = 8):
        if engine not in ("fma", "dot"):
            raise ValueError(f"GemvChain: engine must be 'fma' or 'dot', got {engine!r}")
        self.w = weights
        self.n_layers, self.qkv, self.hidden = weights["qkv"].shape
        self.inter, self.vocab = weights["up"].shape[1] // 2, weights["lm"].shape[0]
        if self.qkv < self.hidden:
            raise ValueError(f"GemvChain: o_proj reads the first {self.hidden} QKV outputs, got {self.qkv}")
        if max(t.numel() for t in weights.values()) >= 2**31:
            raise ValueError("GemvChain: every stacked weight must hold fewer than 2^31 elements (int32 offsets)")
        self.fp8 = weights["qkv"].dtype == FP8
        device = weights["qkv"].device
        act = torch.bfloat16
        self.x_buf = torch.zeros((self.n_layers + 1, self.hidden), dtype=act, device=device)
        self.qkv_buf = torch.zeros((self.n_layers, self.qkv), dtype=act, device=device)
        self.o_buf = torch.zeros((self.n_layers, self.hidden), dtype=act, device=device)
        self.act_buf = torch.zeros((self.n_layers, self.inter), dtype=act, device=device)
        self.logits = torch.zeros((self.vocab,), dtype=torch.float32, device=device)
        self.counter = torch.zeros((1,), dtype=torch.int32, device=device)
        self.err = torch.zeros((1,), dtype=torch.int32, device=device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self.programs = programs or sms
        self.engine, self.num_warps = engine, num_warps
        self.tiles = {"BN_QKV": 16, "BN_O": 16, "BN_UP": 16, "BN_DOWN": 16, "BN_LM": 16, "BLOCK_K": 512,
                      **(tiles or {})}
        self.phases = PHASES_PER_LAYER * self.n_layers + 1

    def _launch(self, phase_lo: int, phase_hi: int, barrier: bool) -> None:
        w = self.w
        dot_dtype = {FP8: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
        if INTERPRETED:
            dot_dtype = {dtype: tl.float32 for dtype in dot_dtype}  # numpy has no bf16
        _chain_kernel[(self.programs,)](
            self.x_buf, self.qkv_buf, self.o_buf, self.act_buf, self.logits, w["qkv"], w["s_qkv"], w["o"], w["s_o"],
            w["up"], w["s_up"], w["down"], w["s_down"], w["lm"], w["s_lm"], self.counter, self.err, phase_lo,
            phase_hi, self.n_layers, H=self.hidden, QKV=self.qkv, INTER=self.inter, VOCAB=self.vocab,
            QUANT=2 if self.fp8 else 0, LM_QUANT=2 if w["lm"].dtype == FP8 else 0, DOT=self.engine == "dot",
            DOT_DTYPE=dot_dtype[w["qkv"].dtype], LM_DOT_DTYPE=dot_dtype[w["lm"].dtype], BARRIER=barrier,
            MAX_SPINS_C=MAX_SPINS, num_warps=self.num_warps, **self.tiles)

    def run(self, x: torch.Tensor, barrier: bool = True) -> torch.Tensor:
        """Logits (vocab,) float32 of x (hidden,); the intermediate vectors stay in the buffers."""
        self.x_buf[0].copy_(x)
        if barrier:
            self.counter.zero_()
            self._launch(0, self.phases, True)
        else:
            for phase in range(self.phases):
                self._launch(phase, phase + 1, False)
        return self.logits

    def outputs(self) -> list[torch.Tensor]:
        """Each phase's output vector, in phase order (the logits last)."""
        per_layer = [[self.qkv_buf[i], self.o_buf[i], self.act_buf[i], self.x_buf[i + 1]] for i in range(self.n_layers)]
        return [t for layer in per_layer for t in layer] + [self.logits]

    def inputs(self) -> list[torch.Tensor]:
        """Each phase's input vector, in phase order."""
        per_layer = [[self.x_buf[i], self.qkv_buf[i, :self.hidden], self.o_buf[i], self.act_buf[i]]
                     for i in range(self.n_layers)]
        return [t for layer in per_layer for t in layer] + [self.x_buf[self.n_layers]]

    def check_barriers(self) -> None:
        """Raises if a grid barrier gave up (read after the GPU finished)."""
        if int(self.err.item()):
            raise RuntimeError("GemvChain: a grid barrier timed out (were all programs resident?)")


def interpreter_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quantize_fp8 as Triton 3.9's interpreter rounds: to nearest with ties away from zero (10.5 -> 11,
    400 -> 416), and a rounding up into a power of two whose e4m3 exponent field is even loses the carry
    (124.1 -> 64, not 128; 31.98 -> 16; but 254.5 -> 256). Subnormals (|x / scale| < 2^-6, at most
    3.5e-5 of the row's largest value) round otherwise and are not emulated. tests/test_persistent_chain.py checks this
    against the interpreter."""
    target = (x.float() / scale).abs().clamp(max=448.0)
    bits = quantize_fp8(x, scale).view(torch.uint8)
    sign, magnitude = bits & 0x80, bits & 0x7F
    below = magnitude.view(FP8).float()
    above = (magnitude + 1).clamp(max=0x7E).view(FP8).float()
    magnitude = magnitude + ((below < target) & (above - target == target - below)).to(torch.uint8)  # ties away
    rounded_up = magnitude.view(FP8).float() > target
    exponent = magnitude >> 3
    carried = rounded_up & (magnitude & 0x07 == 0) & (exponent % 2 == 0) & (exponent >= 2)
    return (sign | (magnitude - 0x08 * carried.to(torch.uint8))).view(FP8)


def reference_phase(weights: dict, phase: int, v: torch.Tensor, interpreter: bool = False) -> torch.Tensor:
    """Phase `phase` of the chain in torch on its input vector v. As linear_small_m's reference: FP8
    y = (q_x @ q_w.T) * x_scale * w_scale with a per-token x_scale = amax / 448, SwiGLU in float32;
    `interpreter`: x quantized as Triton's interpreter does (interpreter_e4m3)."""
    n_layers = weights["qkv"].shape[0]
    name = "lm" if phase == PHASES_PER_LAYER * n_layers else ("qkv", "o", "up", "down")[phase % PHASES_PER_LAYER]
    w, s = (weights[name], weights["s_" + name]) if name == "lm" else (weights[name][phase // PHASES_PER_LAYER],
                                                                        weights["s_" + name][phase // PHASES_PER_LAYER])
    x = v.float()
    if w.dtype == FP8:
        x_scale = x.abs().amax().clamp(min=MIN_AMAX) * INV_FP8_MAX
        x = (interpreter_e4m3 if interpreter else quantize_fp8)(x, x_scale).float()
        y = (w.float() @ x) * x_scale * s
    else:
        y = w.float() @ x
    if name == "up":
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    return y.to(torch.float32 if name == "lm" else torch.bfloat16)


def reference_phases(weights: dict, inputs: list[torch.Tensor], interpreter: bool = False) -> list[torch.Tensor]:
    """Each phase in torch, fed `inputs[i]`, the vector phase i reads (x, then per layer the QKV
    output's first `hidden` values, o, act, the layer's output): phase by phase, so that a test sees
    each phase's own error, not the chain's accumulated rounding."""
    return [reference_phase(weights, phase, v, interpreter) for phase, v in enumerate(inputs)]
