"""Parity of com.qins.QinsGroupQueryAttention: the device under test against the library's
CPU kernel, in ONNX Runtime.

    python check_attention.py LIB --json OUT.json [--quick] [--device cuda|cpu] [--seed N]
                              [--tol-scale X] [--numpy-check] [--only TEXT] [--part I/N]

Every case is a single-node model run twice: with the library on CPUExecutionProvider (the
reference) and on the device under test (--device cuda: CUDAExecutionProvider only, with CPU
fallback disabled so that a node ORT would quietly place on the CPU fails the case instead of
passing it; --device cpu runs CPU against CPU, to test this script). Both runs go through
IoBinding with every output pre-filled with NaN (float) or 0xFF bytes (V rows: a NaN scale),
so a row the kernel fails to write cannot pass.

Compared, on the rows the contract defines (real tokens of each sequence; the whole buffer when
past and present are one buffer, which also checks that nothing outside the new rows moved):
  output, present_key: nMSE = sum((a - b)^2) / sum(b^2) against the CPU, <= 1e-6 (f32) or
      2e-5 (f16), times --tol-scale;
  present_value: both sides' rows decoded with the codec's formula (LUT[code] * scale), nMSE of
      the decoded rows against the CPU's <= 1e-6 times --tol-scale (codes may differ on ties);
  worst single row (one head's output row, one K row): nMSE <= 100 times the tolerance, since
      the aggregate over thousands of rows would hide one wrong row (the worst V row and the
      count of V rows whose bytes differ are reported, not checked: a tie moves a whole step);
  one shared buffer: no row outside the run's new rows may change.
Padded query rows of a first prompt (past a sequence's length) are left out of the check (their
nMSE is reported as nmse_out_all_rows), as are padded new K/V rows.
--numpy-check also holds the CPU reference to a float64 numpy attention written from the
contract (cases of up to 20k query x head rows), against V as stored.

Sweep: f32 and f16; SmolLM2 (9, 3, 64) and Phi-3.5 (32, 32, 96) heads; v_bits 8 and 4; first
prompts of 1, 7, 64, 300, 1024 (+ 4096, 8192 without --quick) tokens, batch 1 and batch 2 with
the second sequence right-padded to ~2/3; token steps after 1, 17, 1000, 4095 (+ 8191) cached
positions, separate past/present buffers, batch 1 and 3 with three cache lengths; then edges:
one shared past/present buffer of 2048 positions (steps, a first prompt, a continued prompt),
continued prompts of 5 tokens after 33, local_window_size 16, softcap 30, interleaved rotary,
no rotary, partial rotary, no past inputs, a scalar total_sequence_length. Q/K/V are packed in
`query` for batch 1 and 3, separate inputs for batch 2. Data: numpy default_rng([seed, case]);
Q, K N(0, 1), V N(0, 0.5); past K random; past V rows encoded by the library itself (a CPU first
prompt of random V), so every past row is a row the encoder can produce.

Bad inputs (v_bits=6, a wrong V row size, seqlens_k past the buffer) run in a child process
each, so that a crash is recorded as a failure instead of ending the sweep: they must raise.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import lut, ort_session, rope_tables  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("lib")
ap.add_argument("--json")
ap.add_argument("--quick", action="store_true")
ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
ap.add_argument("--seed", type=int, default=20240)
ap.add_argument("--tol-scale", type=float, default=1.0)
ap.add_argument("--numpy-check", action="store_true", help="also check the CPU reference against numpy")
ap.add_argument("--only", help="run only cases whose name contains this string")
ap.add_argument("--part", help="I/N: run every N-th case from the I-th (0-based), so that one sweep can be spread "
                "over several device calls; the bad inputs run in part 0")
ap.add_argument("--bad-case", help=argparse.SUPPRESS)  # internal: run one bad-input case (child process)
args = ap.parse_args()
LIB = os.path.abspath(args.lib)
if not os.path.isfile(LIB):
    sys.exit(f"{LIB}: no such library")

SHAPES = {"smol": (9, 3, 64), "phi": (32, 32, 96)}  # (num_heads, kv_num_heads, head size)
NP = {"f32": np.float32, "f16": np.float16}
ONNX_T = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16}
TOL = {"f32": 1e-6, "f16": 2e-5}
TOL_V = 1e-6
SHARED_BUF = 2048
INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
          "cos_cache", "sin_cache"]


# ---------------------------------------------------------------------------------------------
# The codec (docs/FORMAT.md), from its formula: not the library's code.

LUT = {8: lut(8), 4: lut(4)}


def row_bytes(v_bits, d):
    return d * v_bits // 8 + 4


def decode_rows(rows, v_bits):
    """[..., R] uint8 V rows -> [..., D] float64: LUT[code] * scale (f32 after the codes)."""
    rows = np.ascontiguousarray(rows)
    scale = rows[..., -4:].copy().view("<f4")[..., 0].astype(np.float64)
    codes = rows[..., :-4]
    if v_bits == 4:  # two codes a byte, low nibble first
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    return LUT[v_bits][codes].astype(np.float64) * scale[..., None]


def nmse(a, b):
    """sum((a - b)^2) / sum(b^2), b the reference; NaN anywhere gives NaN (a failure)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num, den = float(((a - b) ** 2).sum()), float((b ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def worst_row(a, b, d):
    """The largest nMSE of one row of d values (a's and b's last axis cut into rows of d): the
    aggregate nMSE hides one wrong row among thousands."""
    a = np.asarray(a, np.float64).reshape(-1, d)
    b = np.asarray(b, np.float64).reshape(-1, d)
    if a.size == 0:
        return 0.0
    num, den = ((a - b) ** 2).sum(axis=1), (b ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num == 0, 0.0, np.inf))
    e[np.isnan(num)] = np.nan
    return float(np.nan if np.isnan(e).any() else e.max())


# ---------------------------------------------------------------------------------------------
# Models and sessions.

def model(c):
    """The single-node model of case c. Shapes are left unknown so that ORT passes whatever it
    is fed to the op (the bad-input cases depend on it)."""
    t = ONNX_T[c["dtype"]]
    ins = ["query", "" if c["packed"] else "key", "" if c["packed"] else "value",
           "" if c.get("omit_past") else "past_key", "" if c.get("omit_past") else "past_value",
           "seqlens_k", "total_sequence_length"]
    if c["rotary"]:
        ins += ["cos_cache", "sin_cache"]
    types = {"past_value": TensorProto.UINT8, "seqlens_k": TensorProto.INT32, "total_sequence_length": TensorProto.INT32}
    graph_in = [helper.make_tensor_value_info(n, types.get(n, t), None) for n in ins if n]
    graph_out = [helper.make_tensor_value_info("output", t, None), helper.make_tensor_value_info("present_key", t, None),
                 helper.make_tensor_value_info("present_value", TensorProto.UINT8, None)]
    attrs = dict(num_heads=c["H"], kv_num_heads=c["KVH"], v_bits=c["v_bits"], do_rotary=int(bool(c["rotary"])),
                 rotary_interleaved=int(c["rotary"] == "interleaved"), local_window_size=c.get("window", -1),
                 softcap=float(c.get("softcap", 0.0)), scale=float(c.get("scale", 0.0)))
    node = helper.make_node("QinsGroupQueryAttention", ins, ["output", "present_key", "present_value"],
                            domain="com.qins", name="attn", **attrs)
    g = helper.make_graph([node], "qins_gqa", graph_in, graph_out)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.qins", 1)],
                             ir_version=9)


def session(m, device):
    return ort_session(LIB, m, device)


def ort_device(device):
    return "cuda" if device == "cuda" else "cpu"


def run(sess, device, feeds, out_shapes, shared=None):
    """One run through IoBinding. feeds: name -> numpy (copied to the device by ORT).
    out_shapes: name -> (shape, dtype), outputs pre-filled with NaN / 0xFF on the device.
    shared: (past_key, past_value) numpy arrays to put in ONE device buffer each, bound as both
    the past input and the present output. Returns name -> numpy."""
    dev = ort_device(device)
    io = sess.io_binding()
    keep = []  # host arrays behind CPU OrtValues must outlive the run
    for n, a in feeds.items():
        io.bind_cpu_input(n, a)
    shared_values = {}
    if shared is not None:
        for past, present, a in zip(["past_key", "past_value"], ["present_key", "present_value"], shared):
            a = np.ascontiguousarray(a).copy()
            v = ort.OrtValue.ortvalue_from_numpy(a, dev, 0)
            keep += [a, v]
            io.bind_ortvalue_input(past, v)
            shared_values[present] = v
    # Outputs in this order: copy_outputs_to_cpu returns them in the order they were bound.
    names = ["output", "present_key", "present_value"]
    for n in names:
        if n in shared_values:
            io.bind_ortvalue_output(n, shared_values[n])
            continue
        shape, dt = out_shapes[n]
        a = np.full(shape, 0xFF, np.uint8) if dt == np.uint8 else np.full(shape, np.nan, dt)
        v = ort.OrtValue.ortvalue_from_numpy(a, dev, 0)
        keep += [a, v]
        io.bind_ortvalue_output(n, v)
    sess.run_with_iobinding(io)
    io.synchronize_outputs()
    return dict(zip(names, io.copy_outputs_to_cpu()))


# ---------------------------------------------------------------------------------------------
# Test data.

_encoders = {}


def encoded_rows(rng, batch, kvh, d, v_bits, positions):
    """[batch, kvh, positions, R] valid V rows, encoded by the library itself: a CPU first
    prompt of `positions` tokens with random V (N(0, 0.5)). num_heads = kv_num_heads and
    local_window_size = 1 keep its attention O(positions): only present_value is kept."""
    if positions == 0:
        return np.zeros((batch, kvh, 0, row_bytes(v_bits, d)), np.uint8)
    key = (kvh, d, v_bits)
    if key not in _encoders:
        c = dict(dtype="f32", H=kvh, KVH=kvh, v_bits=v_bits, packed=True, rotary=None, window=1, omit_past=True)
        _encoders[key] = session(model(c), "cpu")
    q = rng.standard_normal((batch, positions, 3, kvh, d)).astype(np.float32)
    q[:, :, 2] *= 0.5
    feeds = {"query": q.reshape(batch, positions, 3 * kvh * d),
             "seqlens_k": np.full(batch, positions - 1, np.int32),
             "total_sequence_length": np.array([positions], np.int32)}
    return _encoders[key].run(["present_value"], feeds)[0]


def make_inputs(c, rng):
    """Feeds of case c and what the comparison needs to know (lengths, shapes, sharing)."""
    H, KVH, D = c["H"], c["KVH"], c["D"]
    dt = NP[c["dtype"]]
    B, S = c["batch"], c["S"]
    R = row_bytes(c["v_bits"], D)
    if c["kind"] == "prompt":
        total_b = c["lens"]  # real tokens of each sequence (right padding up to S)
        past_b = [0] * B
        total, P = S, (c["buf"] if c["shared"] else 0)
    else:
        past_b = c["lens"]  # cached tokens before this run
        total_b = [p + S for p in past_b]
        total = max(total_b)
        P = c["buf"] if c["shared"] else max(past_b)
    present = max(total, P)
    q = rng.standard_normal((B, S, H, D)).astype(dt)
    k = rng.standard_normal((B, S, KVH, D)).astype(dt)
    v = (rng.standard_normal((B, S, KVH, D)) * 0.5).astype(dt)
    feeds = {}
    if c["packed"]:
        feeds["query"] = np.concatenate([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], axis=2)
    else:
        feeds.update(query=q.reshape(B, S, -1), key=k.reshape(B, S, -1), value=v.reshape(B, S, -1))
    past_key = rng.standard_normal((B, KVH, P, D)).astype(dt)
    past_value = encoded_rows(rng, B, KVH, D, c["v_bits"], P)
    shared = None
    if c["shared"]:
        shared = (past_key, past_value)
    elif not c.get("omit_past"):
        feeds.update(past_key=past_key, past_value=past_value)
    feeds["seqlens_k"] = np.array([t - 1 for t in total_b], np.int32)
    feeds["total_sequence_length"] = np.array(total, np.int32) if c.get("total_scalar") else np.array([total], np.int32)
    cos = sin = None
    if c["rotary"]:
        rot_dim = c.get("rot_dim", D)
        max_pos = max(p + S for p in past_b)  # the largest position a token takes, + 1
        cos, sin = rope_tables(max_pos, rot_dim, dt)
        feeds.update(cos_cache=cos, sin_cache=sin)
    out_shapes = {"output": ((B, S, H * D), dt), "present_key": ((B, KVH, present, D), dt),
                  "present_value": ((B, KVH, present, R), np.uint8)}
    info = dict(past_b=past_b, total_b=total_b, P=P, present=present, q=q, k=k, v=v, past_key=past_key,
                past_value=past_value, cos=cos, sin=sin)
    return feeds, out_shapes, shared, info


# ---------------------------------------------------------------------------------------------
# The float64 reference of the contract (--numpy-check).

def rope(x, pos, c, info):
    """x [..., D] float32 rotated to positions pos (broadcast over x's leading axes)."""
    if not c["rotary"]:
        return x
    rot_dim = c.get("rot_dim", c["D"])
    half = rot_dim // 2
    cs = info["cos"].astype(np.float32)[pos]
    sn = info["sin"].astype(np.float32)[pos]
    if c["rotary"] == "interleaved":
        ia, ib = np.arange(0, rot_dim, 2), np.arange(1, rot_dim, 2)
    else:
        ia, ib = np.arange(half), np.arange(half, rot_dim)
    y = x.copy()
    y[..., ia] = x[..., ia] * cs - x[..., ib] * sn
    y[..., ib] = x[..., ib] * cs + x[..., ia] * sn
    return y


def numpy_reference(c, info, present_value):
    """Output [B, S, H*D] and present_key rows from the contract; V as the CPU stored it."""
    H, KVH, D, S = c["H"], c["KVH"], c["D"], c["S"]
    dt = NP[c["dtype"]]
    group = H // KVH
    alpha = c.get("scale", 0.0) or 1.0 / np.sqrt(D)
    out = np.zeros((c["batch"], S, H, D))
    keys = []
    for b in range(c["batch"]):
        pb, tb = info["past_b"][b], info["total_b"][b]
        pos = pb + np.arange(S)
        # Q and K rotated in f32 and rounded to the model's type, as GroupQueryAttention does.
        qr = rope(info["q"][b].astype(np.float32), pos[:, None], c, info).astype(dt).astype(np.float64)
        kr = rope(info["k"][b].astype(np.float32), pos[:, None], c, info).astype(dt).astype(np.float64)
        kall = np.concatenate([info["past_key"][b, :, :pb].astype(np.float64), kr.transpose(1, 0, 2)], axis=1)
        keys.append(kall)
        vall = decode_rows(present_value[b, :, : pb + S], c["v_bits"])
        for s in range(S):
            end = min(pb + s + 1, max(tb, 1))
            start = end - c["window"] - 1 if c.get("window", -1) > 0 and end > c["window"] + 1 else 0
            for h in range(H):
                kv = h // group
                sc = alpha * (kall[kv, start:end] @ qr[s, h])
                if c.get("softcap", 0.0) > 0:
                    sc = c["softcap"] * np.tanh(sc / c["softcap"])
                p = np.exp(sc - sc.max())
                out[b, s, h] = (p / p.sum()) @ vall[kv, start:end]
    return out.reshape(c["batch"], S, H * D).astype(dt), keys


# ---------------------------------------------------------------------------------------------
# One case.

def compare(c, info, ref, got):
    """nMSEs on the rows the contract defines."""
    B, S = c["batch"], c["S"]
    shared = c["shared"]
    out_rows = [(b, s) for b in range(B) for s in range(S) if s < info["total_b"][b] - info["past_b"][b]]
    bi, si = np.array([r[0] for r in out_rows]), np.array([r[1] for r in out_rows])
    r = dict(nmse_out=nmse(got["output"][bi, si], ref["output"][bi, si]))
    r["worst_row_out"] = worst_row(got["output"][bi, si], ref["output"][bi, si], c["D"])
    # Padded query rows of a first prompt are not part of the contract: reported, not checked.
    if len(out_rows) < B * S:
        r["nmse_out_all_rows"] = nmse(got["output"], ref["output"])
    # Present rows compared per sequence: its real rows; with one shared buffer, every row but
    # the padding rows of a first prompt (new rows past the sequence's length, whose content
    # the contract leaves open).
    ks, vs_got, vs_ref = [], [], []
    changed = 0
    for b in range(B):
        pb, tb = info["past_b"][b], info["total_b"][b]
        rows = np.zeros(info["present"], bool)
        if shared:
            rows[:] = True
            rows[tb: pb + S] = False
        else:
            rows[:tb] = True
        ks.append((got["present_key"][b][:, rows], ref["present_key"][b][:, rows]))
        vs_got.append(got["present_value"][b][:, rows])
        vs_ref.append(ref["present_value"][b][:, rows])
        if shared:
            # One buffer: only the new rows may change. Rows the device changed elsewhere,
            # counted against the buffers as they were before the run.
            old = np.ones(info["present"], bool)
            old[pb: pb + S] = False
            changed += int((got["present_key"][b][:, old] != info["past_key"][b][:, old]).any(axis=-1).sum())
            changed += int((got["present_value"][b][:, old] != info["past_value"][b][:, old]).any(axis=-1).sum())
    r["nmse_key"] = nmse(np.concatenate([a.ravel() for a, _ in ks]), np.concatenate([b.ravel() for _, b in ks]))
    dg = np.concatenate([decode_rows(x, c["v_bits"]).ravel() for x in vs_got])
    dr = np.concatenate([decode_rows(x, c["v_bits"]).ravel() for x in vs_ref])
    r["nmse_value_rows"] = nmse(dg, dr)
    r["worst_row_key"] = worst_row(np.concatenate([a.ravel() for a, _ in ks]), np.concatenate([b.ravel() for _, b in ks]),
                                   c["D"])
    # Not checked: a code that flips on a tie moves its row by a whole step.
    r["worst_row_value"] = worst_row(dg, dr, c["D"])
    r["value_rows_differing"] = int(sum((x != y).any(axis=-1).sum() for x, y in zip(vs_got, vs_ref)))
    if shared:
        r["rows_outside_new_changed"] = changed
    return r


def run_case(i, c):
    rng = np.random.default_rng([args.seed, i])
    feeds, out_shapes, shared, info = make_inputs(c, rng)
    m = model(c)
    t0 = time.time()
    ref = run(session(m, "cpu"), "cpu", feeds, out_shapes, shared)
    got = run(session(m, args.device), args.device, feeds, out_shapes, shared)
    r = compare(c, info, ref, got)
    tol = TOL[c["dtype"]] * args.tol_scale
    ok = r["nmse_out"] <= tol and r["nmse_key"] <= tol and r["nmse_value_rows"] <= TOL_V * args.tol_scale
    ok = ok and r.get("rows_outside_new_changed", 0) == 0
    # One head's output row or one K row: 100 times the tolerance (rounding spreads evenly
    # over the rows; a wrong row does not). An output row is also allowed the worst V row's
    # difference: each side attends to the V rows it stored, and a code that flips on a tie
    # (the device's row sums differ from the CPU's in the last bit) moves its row by a whole
    # step, 1/15 of the row's range at q4; a query that attends mostly to such a row inherits
    # it (H100, 2026-12-07: f32 Phi q4 prompt of 8192, worst output row 3.0e-4 against a
    # worst V row of 2.5e-3). A wrong output row is far above either bound.
    out_bar = max(100 * tol, r["worst_row_value"])
    ok = ok and r["worst_row_out"] <= out_bar and r["worst_row_key"] <= 100 * tol
    # (numpy loops over queries and heads in Python: cases of up to ~20k of them)
    if args.numpy_check and c["batch"] * c["S"] * c["H"] <= 20000:
        out_np, keys = numpy_reference(c, info, ref["present_value"])
        bi = [b for b in range(c["batch"]) for s in range(c["S"]) if s < info["total_b"][b] - info["past_b"][b]]
        si = [s for b in range(c["batch"]) for s in range(c["S"]) if s < info["total_b"][b] - info["past_b"][b]]
        r["nmse_cpu_vs_numpy_out"] = nmse(ref["output"][bi, si], out_np[bi, si])
        r["nmse_cpu_vs_numpy_key"] = nmse(
            np.concatenate([ref["present_key"][b, :, : info["total_b"][b]].ravel() for b in range(c["batch"])]),
            np.concatenate([keys[b][:, : info["total_b"][b]].ravel() for b in range(c["batch"])]))
        # The reference's own rounding: f16 outputs and keys are rounded to f16 (u = 2^-11).
        tol_np = 4 * 2.0**-22 if c["dtype"] == "f16" else 1e-9
        ok = ok and r["nmse_cpu_vs_numpy_out"] <= tol_np and r["nmse_cpu_vs_numpy_key"] <= tol_np
    r["seconds"] = round(time.time() - t0, 3)
    r["ok"] = bool(ok)
    return r


# ---------------------------------------------------------------------------------------------
# The sweep.

def case(name, dtype, shape, v_bits, kind, batch, S, lens, **kw):
    H, KVH, D = SHAPES[shape]
    c = dict(name=name, dtype=dtype, shape=shape, H=H, KVH=KVH, D=D, v_bits=v_bits, kind=kind, batch=batch, S=S,
             lens=list(lens), shared=False, buf=0, rotary="halves", window=-1, softcap=0.0, scale=0.0)
    # Packed Q/K/V for batch 1 and 3, separate inputs for batch 2, so that both layouts run
    # at every size.
    c["packed"] = batch != 2
    c.update(kw)
    return c


def cases():
    prompt_lens = [1, 7, 64, 300, 1024] + ([] if args.quick else [4096, 8192])
    step_caches = [1, 17, 1000, 4095] + ([] if args.quick else [8191])
    out = []
    for dtype in ("f32", "f16"):
        for shape in ("smol", "phi"):
            for vb in (8, 4):
                tag = f"{dtype}/{shape}/q{vb}"
                for L in prompt_lens:
                    out.append(case(f"{tag}/prompt{L}/b1", dtype, shape, vb, "prompt", 1, L, [L]))
                    # The second sequence right-padded: about 2/3 of the length (a 1-token
                    # prompt cannot be shorter).
                    out.append(case(f"{tag}/prompt{L}/b2", dtype, shape, vb, "prompt", 2, L, [L, max(1, 2 * L // 3)]))
                for ctx in step_caches:
                    out.append(case(f"{tag}/step{ctx}/b1", dtype, shape, vb, "step", 1, 1, [ctx]))
                    # Three sequences, three cache lengths (the first the longest).
                    out.append(case(f"{tag}/step{ctx}/b3", dtype, shape, vb, "step", 3, 1,
                                    [ctx, max(1, ctx // 3), max(1, ctx - 7)]))
        # Edges, once per model type (SmolLM2 shapes unless said).
        t = dtype
        out += [
            case(f"{t}/smol/q8/shared-step/b1", t, "smol", 8, "step", 1, 1, [700], shared=True, buf=SHARED_BUF),
            # The last row of the buffer written by the first sequence; a 1-token cache too.
            case(f"{t}/smol/q4/shared-step/b3", t, "smol", 4, "step", 3, 1, [SHARED_BUF - 1, 1, 700],
                 shared=True, buf=SHARED_BUF),
            case(f"{t}/phi/q8/shared-step/b1", t, "phi", 8, "step", 1, 1, [1500], shared=True, buf=SHARED_BUF),
            # A first prompt into one buffer (onnxruntime-genai's past_present_share_buffer).
            case(f"{t}/smol/q8/shared-prompt64/b2", t, "smol", 8, "prompt", 2, 64, [64, 40], shared=True,
                 buf=SHARED_BUF),
            case(f"{t}/smol/q8/continue5/b1", t, "smol", 8, "continue", 1, 5, [33], packed=False, total_scalar=True),
            case(f"{t}/phi/q4/continue5/b1", t, "phi", 4, "continue", 1, 5, [33]),
            case(f"{t}/smol/q8/continue5-shared/b1", t, "smol", 8, "continue", 1, 5, [33], shared=True,
                 buf=SHARED_BUF),
            case(f"{t}/smol/q8/window16/prompt64/b2", t, "smol", 8, "prompt", 2, 64, [64, 40], window=16),
            case(f"{t}/smol/q8/window16/step100/b3", t, "smol", 8, "step", 3, 1, [100, 10, 17], window=16),
            # scale 0.5 makes scores large enough for the cap to matter.
            case(f"{t}/smol/q8/softcap30/prompt64/b2", t, "smol", 8, "prompt", 2, 64, [64, 40], softcap=30.0,
                 scale=0.5),
            case(f"{t}/smol/q8/softcap30/step100/b1", t, "smol", 8, "step", 1, 1, [100], softcap=30.0, scale=0.5),
            case(f"{t}/smol/q8/interleaved/prompt64/b2", t, "smol", 8, "prompt", 2, 64, [64, 40],
                 rotary="interleaved"),
            case(f"{t}/phi/q8/interleaved/step100/b3", t, "phi", 8, "step", 3, 1, [100, 3, 50], rotary="interleaved"),
            case(f"{t}/smol/q8/no-rotary/prompt64/b2", t, "smol", 8, "prompt", 2, 64, [64, 40], rotary=None),
            case(f"{t}/smol/q4/no-rotary/step100/b3", t, "smol", 4, "step", 3, 1, [100, 3, 50], rotary=None),
            case(f"{t}/phi/q8/partial-rotary/prompt64/b1", t, "phi", 8, "prompt", 1, 64, [64], rot_dim=48),
            case(f"{t}/smol/q8/no-past/prompt64/b2", t, "smol", 8, "prompt", 2, 64, [64, 40], omit_past=True),
        ]
    if args.only:
        out = [c for c in out if args.only in c["name"]]
    if args.part:
        i, n = part()
        out = out[i::n]
    return out


def part():
    """--part I/N as (I, N); (0, 1) without it."""
    if not args.part:
        return 0, 1
    try:
        i, n = (int(x) for x in args.part.split("/"))
    except ValueError:
        sys.exit(f"--part {args.part}: expected I/N, e.g. 0/2")
    if not 0 <= i < n:
        sys.exit(f"--part {args.part}: I must be in 0..N-1")
    return i, n


# ---------------------------------------------------------------------------------------------
# Bad inputs: each must raise an error (not crash, not run) on the device under test, except
# a seqlens_k the buffers cannot hold on CUDA: it lives on the device, and the kernels cannot
# report it without a host synchronisation (nor does ORT's GroupQueryAttention check it there),
# so the contract (docs/FORMAT.md) has them skip the sequence: the run succeeds, the
# sequence's output is zero and no buffer row changes (compute-sanitizer, run.sh
# sanitize-attention, checks that nothing outside the buffers is touched).

BAD = {
    "bad/v_bits=6": "attribute v_bits=6 (only 8 or 4)",
    "bad/past_value-row-size": "past_value rows of R + 4 bytes",
    "bad/seqlens_k-past-buffer": "seqlens_k = 40 with a 16-position past (separate buffers)",
    "bad/seqlens_k-past-shared-buffer": "seqlens_k = buffer length with a shared 2048-position buffer",
}


def bad_case(name):
    """Runs in a child process. Exit 0: raised (expected); 3: ran without an error."""
    rng = np.random.default_rng([args.seed, 99])
    if name == "bad/v_bits=6":
        c = case(name, "f16", "smol", 8, "step", 1, 1, [16])
        feeds, shapes, shared, _ = make_inputs(c, rng)
        c["v_bits"] = 6
    elif name == "bad/past_value-row-size":
        c = case(name, "f16", "smol", 8, "step", 1, 1, [16])
        feeds, shapes, shared, _ = make_inputs(c, rng)
        pv = feeds["past_value"]
        feeds["past_value"] = np.concatenate([pv, np.zeros(pv.shape[:-1] + (4,), np.uint8)], axis=-1)
    elif name == "bad/seqlens_k-past-buffer":
        c = case(name, "f16", "smol", 8, "step", 1, 1, [16])
        feeds, shapes, shared, _ = make_inputs(c, rng)
        feeds["seqlens_k"] = np.array([40], np.int32)
    else:
        c = case(name, "f16", "smol", 8, "step", 1, 1, [100], shared=True, buf=SHARED_BUF)
        feeds, shapes, shared, _ = make_inputs(c, rng)
        # total_b = 2049 > the buffer, while total_sequence_length = the buffer's length (a
        # larger one makes present larger than the bound buffer, which ORT itself refuses);
        # cos/sin long enough that only seqlens_k is wrong.
        feeds["seqlens_k"] = np.array([SHARED_BUF], np.int32)
        feeds["total_sequence_length"] = np.array([SHARED_BUF], np.int32)
        feeds["cos_cache"], feeds["sin_cache"] = rope_tables(SHARED_BUF + 1, c["D"], np.float16)
    skips = args.device == "cuda" and name.startswith("bad/seqlens_k")
    try:
        got = run(session(model(c), args.device), args.device, feeds, shapes, shared)
    except Exception as e:  # noqa: BLE001 (any ORT error is what we want)
        if skips:
            print("raised, where the CUDA kernels should skip the sequence:", str(e).strip().splitlines()[0][:300])
            sys.exit(3)
        print("raised:", str(e).strip().splitlines()[0][:300])
        sys.exit(0)
    if skips:
        out_zero = not np.any(np.asarray(got["output"], np.float32))
        # A shared buffer must come back as it was bound (separate ones: the skipped sequence's
        # present rows are left zero, which the contract does not define further).
        kept = bool(shared is None or (np.array_equal(got["present_key"], shared[0])
                                       and np.array_equal(got["present_value"], shared[1])))
        if out_zero and kept:
            print("skipped (output zero, buffer unchanged), as the contract has the CUDA kernels do")
            sys.exit(0)
        print(f"ran without an error but did not skip: output zero {out_zero}, buffer unchanged {kept}")
        sys.exit(3)
    print("no error raised")
    sys.exit(3)


def run_bad(name):
    cmd = [sys.executable, os.path.abspath(__file__), LIB, "--device", args.device, "--seed", str(args.seed),
           "--bad-case", name]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    msg = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode not in (0, 3):
        msg = f"crashed (rc {p.returncode}): {(p.stderr.strip().splitlines() or [''])[-1][:300]}"
    return dict(name=name, what=BAD[name], ok=p.returncode == 0, raised=p.returncode == 0, rc=p.returncode,
                message=msg)


# ---------------------------------------------------------------------------------------------

def codec_self_check():
    """This script's decoder against the library's encoder: rows encoded by the library and
    decoded here must be near the values encoded (q8 ~1e-4, q4 ~1e-2 nMSE)."""
    rng = np.random.default_rng([args.seed, 7])
    for vb, bar in ((8, 2e-4), (4, 4e-2)):
        c = dict(dtype="f32", H=3, KVH=3, v_bits=vb, packed=True, rotary=None, window=1, omit_past=True)
        q = rng.standard_normal((1, 256, 3, 3, 64)).astype(np.float32)
        rows = session(model(c), "cpu").run(["present_value"], {
            "query": q.reshape(1, 256, -1), "seqlens_k": np.array([255], np.int32),
            "total_sequence_length": np.array([256], np.int32)})[0]
        e = nmse(decode_rows(rows[0], vb), q[0, :, 2].transpose(1, 0, 2))
        print(f"codec self-check q{vb}: library-encoded rows decoded here, nMSE {e:.2e} (bar {bar})")
        if not e < bar:
            sys.exit(f"this script's decoder disagrees with the library's rows (q{vb}): stopping")


def main():
    if args.bad_case:
        bad_case(args.bad_case)
    print(f"onnxruntime {ort.__version__}, device {args.device}, seed {args.seed}, lib {LIB}", flush=True)
    codec_self_check()
    results = []
    all_cases = cases()
    for i, c in enumerate(all_cases):
        fields = {k: v for k, v in c.items() if k not in ("name",)}
        try:
            r = run_case(i, c)
        except Exception as e:  # noqa: BLE001 (an error in a valid case is a failure, recorded)
            r = dict(nmse_out=None, nmse_key=None, nmse_value_rows=None, ok=False,
                     error=str(e).strip().splitlines()[0][:500])
        results.append(dict(name=c["name"], **fields, **r))
        fmt = lambda x: "   -    " if x is None else f"{x:.2e}"  # noqa: E731
        extra = f" {r['error']}" if "error" in r else f" ({r['seconds']} s)"
        if "nmse_cpu_vs_numpy_out" in r:
            extra += f" numpy out {r['nmse_cpu_vs_numpy_out']:.1e} key {r['nmse_cpu_vs_numpy_key']:.1e}"
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {c['name']:<44} out {fmt(r['nmse_out'])} key {fmt(r['nmse_key'])} "
              f"v {fmt(r['nmse_value_rows'])}{extra}", flush=True)
    if not args.only and part()[0] == 0:
        for name in BAD:
            r = run_bad(name)
            results.append(r)
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {name:<44} {r['message']}", flush=True)
    passed = sum(r["ok"] for r in results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "onnxruntime": ort.__version__, "seed": args.seed, "quick": args.quick,
                       "part": args.part,
                       "tol_scale": args.tol_scale, "results": results}, f, indent=1)
    sys.exit(1 if failed else 0)


main()
