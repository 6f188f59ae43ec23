#!/usr/bin/env python3
"""Pattern B ("Jacobian weight transport") measured on real SmolLM2 layers with real activations.

Question: can a MatMul run directly on QINS-encoded activations z = E(x) = sign(x)/(1 + a|x|),
without decoding them, through a transported weight W' = J_D W J_E^-1 built from mean
activations? This script captures the real inputs of chosen MatMuls of SmolLM2-135M-Instruct
(fp32 ONNX, genai layout) on Wikipedia text through ONNX Runtime (CPU), and measures on held-out
tokens the relative output error ||Y_hat - Y||_F / ||Y||_F against the exact Y = X W of

  1. the transport, literal (no offset terms; every typed reading of J_D) and linearized (the
     first-order expansion around the means, with the offsets), over a grid of QINS scales a;
  2. the best affine map from E(X) to X W (least squares on the fit tokens, scale and ridge chosen
     on validation tokens): the upper bound of any transport whose output is read in float;
  3. Pattern A, what the product ships: QINS q8/q4 weight codes (read from the rewritten models)
     decoded on the fly, activations left in float.

It also relates the error to the spread of the activations (share of input variance that is not
affine in z, share of entries on the other side of zero from their feature's mean, and a sweep
that shrinks the activations towards their mean).

The derivation and the results are in README.md beside this script.

    .deps/venv/bin/python research/pattern-b/pattern_b.py [--json OUT.json] [--layers 0,10,20,29]

Needs numpy, onnx, onnxruntime and tokenizers. Deterministic: the article split is seeded, the
rest is plain linear algebra (BLAS summation order aside).
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLES = {  # role -> (MatMul node path inside the layer)
    "qkv": "attn/qkv_proj/MatMul",
    "o_proj": "attn/o_proj/MatMul",
    "gate": "mlp/gate_proj/MatMul",
    "up": "mlp/up_proj/MatMul",
    "down": "mlp/down_proj/MatMul",
}
# QINS scale a, "a |x| ~ c": per tensor (c / rms), per input feature (c / mean|x_k|, c / max|x_k|)
FAMILIES = ("tensor_rms", "feature_mean", "feature_absmax")
GRID_T = [4.0**e for e in range(-4, 4)]  # transport: 1/256 .. 64
GRID_B = [8.0**e for e in range(-2, 3)]  # output scale of the readings with an output code: 1/64 .. 64
GRID_LS = [4.0**e for e in range(-5, 2, 2)]  # affine bound: 1/1024 .. 4, x2 refinement, plus the limit a -> 0
LIMIT = ("a->0", 0.0)  # E_a(x) = sign(x) - a x + O(a^2): the affine fit tends to a fit on sign(x)
RIDGES = (1e-7, 1e-4, 1e-2, 1e-1)  # x trace(G)/K


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- codec
def sgn1(x):
    """sign with sign(0) = +1, the QINS convention."""
    one = x.dtype.type(1)
    return np.where(x >= 0, one, -one)


def enc(x, a):
    """E(x) = sign(x) / (1 + a|x|); a broadcasts over the last axis. a = None: the limit a -> 0
    up to an affine map of each feature, sign(x) (E_a(x) = sign(x) - a x + O(a^2))."""
    if a is None:
        return sgn1(x)
    v = 1 / (1 + np.asarray(a, dtype=x.dtype) * np.abs(x))
    return np.where(x >= 0, v, -v)


def dec(z, a):
    """D(z) = sign(z)(1 - |z|)/(a|z|), with z clipped to [-1, 1] and |z| >= 1e-6 (charitable:
    a transported code outside the codec's range is brought back into it before decoding)."""
    m = np.clip(np.abs(z), 1e-6, 1.0)
    return sgn1(z) * (1.0 - m) / (a * m)


def enc_prime(x, a):
    """dE/dx = -a / (1 + a|x|)^2 (both branches; E jumps from -1 to +1 at x = 0)."""
    return -a / (1.0 + a * np.abs(x)) ** 2


def dec_prime(z, a):
    """dD/dz = -1 / (a z^2) (both branches); at z = E(y) it equals 1 / E'(y)."""
    return -1.0 / (a * z * z)


def scales(X, family, c):
    """QINS scale a for the columns of X (a scalar or one per column): a |x| ~ c."""
    eps = 1e-12
    if family == LIMIT[0]:
        return None
    if family == "tensor_rms":
        return np.float64(c / max(np.sqrt(np.mean(X.astype(np.float64) ** 2)), eps))
    if family == "feature_mean":
        return c / np.maximum(np.mean(np.abs(X), axis=0, dtype=np.float64), eps)
    if family == "feature_absmax":
        return c / np.maximum(np.max(np.abs(X), axis=0).astype(np.float64), eps)
    raise ValueError(family)


def rel(Yh, Y):
    return float(np.linalg.norm(Yh - Y) / np.linalg.norm(Y))


def colerr2(Yh, Y):
    d = Yh - Y
    return np.einsum("tn,tn->n", d, d)


# ----------------------------------------------------------------------------------------- model
def external_array(model_dir, t):
    """An initializer stored as external data, memory-mapped (onnx keeps location/offset/length)."""
    import onnx

    kv = {e.key: e.value for e in t.external_data}
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.UINT8: np.uint8,
             onnx.TensorProto.FLOAT16: np.float16}[t.data_type]
    if not kv:  # inline
        from onnx import numpy_helper

        return numpy_helper.to_array(t)
    off = int(kv.get("offset", 0))
    n = int(np.prod(t.dims))
    mm = np.memmap(os.path.join(model_dir, kv["location"]), dtype=np.uint8, mode="r")
    return np.frombuffer(mm[off:off + n * np.dtype(dtype).itemsize].tobytes(), dtype=dtype).reshape(tuple(t.dims))


def load_model(model_dir, layers):
    """{(layer, role): (activation name, float weight [K, N])} of the chosen MatMuls, the Q and K
    column counts of the packed qkv, and the decoder config."""
    import onnx

    m = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    mats = {}
    for i in layers:
        for role, path in ROLES.items():
            n = nodes[f"/model/layers.{i}/{path}"]
            mats[(i, role)] = (n.input[0], external_array(model_dir, inits[n.input[1]]).astype(np.float32))
    cfg = json.load(open(os.path.join(model_dir, "genai_config.json")))["model"]["decoder"]
    hd = cfg["head_size"]
    split = (cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd)  # Q, K columns
    return mats, split, cfg


def capture(model_dir, names, cfg, seqsets):
    """Run ONNX Runtime (CPU, fp32 model, empty KV cache) on each token sequence with the
    activation tensors as extra graph outputs; returns, per set of sequences, {name: [T, K]}."""
    import onnx
    import onnxruntime as ort

    # the whole model in memory (540 MB of fp32 weights, under protobuf's 2 GB limit): ORT refuses
    # external data reached through a link outside the model's folder, and we write nothing there
    p = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=True)
    del p.graph.output[:]
    for nm in names:
        p.graph.output.append(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del p
    L, kvh, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
    empty = np.zeros((1, kvh, 0, hd), np.float32)
    outs = []
    try:
        for seqs in seqsets:
            out = {nm: [] for nm in names}
            for ids in seqs:
                feed = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
                for j in range(L):
                    feed[f"past_key_values.{j}.key"] = empty
                    feed[f"past_key_values.{j}.value"] = empty
                for nm, r in zip(names, sess.run(names, feed)):
                    out[nm].append(r.reshape(-1, r.shape[-1]).astype(np.float32))
            outs.append({nm: np.concatenate(v) for nm, v in out.items()})
    finally:
        del sess
    return outs


def split_text(text_path, tok_path, seed, n_fit, n_val, n_test, max_seq, min_seq=32):
    """Whole articles to fit / validation / test sets (disjoint articles), each article's
    lead section truncated to max_seq tokens, until each set holds its token budget."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    d = json.load(open(text_path))
    titles = sorted(d)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(titles))
    sets, budget, cur = [[], [], []], [n_fit, n_val, n_test], 0
    used = [0, 0, 0]
    for j in order:
        if cur == 3:
            break
        ids = tok.encode(d[titles[j]]["extract"], add_special_tokens=False).ids[:max_seq]
        if len(ids) < min_seq:
            continue
        ids = ids[: budget[cur] - used[cur]]
        sets[cur].append((titles[j], ids))
        used[cur] += len(ids)
        if used[cur] >= budget[cur]:
            cur += 1
    return sets


# ------------------------------------------------------------------------------------ Pattern A
def lut(bits):
    M = 1 << (bits - 1)
    m = np.arange(M, dtype=np.float64)
    z = 1.0 - m * 0.5 / (M - 1)
    u = (1.0 - z) / z
    return np.concatenate([u, -u]).astype(np.float32)  # code = sign << (bits-1) | m


def decode_qins(codes, sc, bits, K, G):
    """Decoded W [K, N] from QinsMatMul codes [N, row_bytes] and scales [N, ceil(K/G)] (FORMAT.md)."""
    N = codes.shape[0]
    if bits == 8:
        c = codes[:, :K]
    elif bits == 4:
        c = np.empty((N, codes.shape[1] * 2), np.uint8)
        c[:, 0::2] = codes & 0xF
        c[:, 1::2] = codes >> 4
        c = c[:, :K]
    else:
        raise ValueError(f"bits {bits} not handled here")
    s = np.repeat(sc.astype(np.float32), G, axis=1)[:, :K]
    return (lut(bits)[c] * s).T.copy()


def pattern_a_weights(qdir, layers):
    """{(layer, role): decoded [K, N]} from a rewritten QINS model (V columns only for qkv)."""
    import onnx

    m = onnx.load(os.path.join(qdir, "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    out, fmt = {}, None
    for n in m.graph.node:
        if n.op_type != "QinsMatMul":
            continue
        for i in layers:
            for role, path in ROLES.items():
                if n.name.startswith(f"/model/layers.{i}/{path.rsplit('/', 1)[0]}/"):
                    at = {a.name: a.i for a in n.attribute}
                    codes = external_array(qdir, inits[n.input[1]])
                    sc = external_array(qdir, inits[n.input[2]])
                    out[(i, role)] = decode_qins(codes, sc, at["bits"], at["K"], at["group_size"])
                    fmt = (at["bits"], at["group_size"])
    return out, fmt


# ------------------------------------------------------------------------------------ transport
Y_VARIANTS = ("lit_JD=I", "lin_y", "lin_y_meancode")
B_VARIANTS = ("lit_JD_y", "lit_JD_z", "lit_JDinv_y", "lit_JDinv_z", "lin_z_JDinv", "lin_z_JD")


def transport_prep(Xf, a, W, zmean=None):
    """J_E^-1 W, the mean output and the two offsets, for input scale a."""
    xbar = Xf.mean(0, dtype=np.float64)
    jinv = 1.0 / enc_prime(xbar, a)  # J_E^-1 (diagonal, K), at the mean activation
    Wt = jinv[:, None] * W.astype(np.float64)  # J_E^-1 W  [K, N]
    ybar = xbar @ W.astype(np.float64)
    off = enc(xbar, a) @ Wt  # linearization point: the code of the mean activation
    if zmean is None:
        zmean = enc(Xf, a).mean(0, dtype=np.float64)
    offm = zmean @ Wt  # alternative: the mean code
    return Wt.astype(np.float32), ybar.astype(np.float32), off.astype(np.float32), offm.astype(np.float32)


def transport_predict(v, Q, ybar, off, offm, b):
    """Output of reading v, given Q = E(X) J_E^-1 W (the transported matmul itself) and, for the
    readings with an output-side J_D, the output scale b (one per output column)."""
    if v == "lit_JD=I":
        return Q
    if v == "lin_y":  # first-order expansion around the means, output in float
        return ybar + (Q - off)
    if v == "lin_y_meancode":
        return ybar + (Q - offm)
    b = b.astype(np.float32)
    zo = enc(ybar, b)  # the mean output code E(ybar)
    jd = dec_prime(zo, b)  # J_D at the mean output code (diagonal, N)
    jdi = 1.0 / jd  # = E'(ybar), the chain-rule factor
    if v == "lit_JD_y":
        return Q * jd
    if v == "lit_JD_z":
        return dec(Q * jd, b)
    if v == "lit_JDinv_y":
        return Q * jdi
    if v == "lit_JDinv_z":
        return dec(Q * jdi, b)
    if v == "lin_z_JDinv":  # codes in, codes out: z_out = zo + (z - zbar) J_E^-1 W E'(ybar), decoded
        return dec(zo + (Q - off) * jdi, b)
    if v == "lin_z_JD":
        return dec(zo + (Q - off) * jd, b)
    raise ValueError(v)


def transport(Xf, Xs, Xt, Ws, Yfs, Yss, Yts, families=FAMILIES, grid=GRID_T, variants=Y_VARIANTS + B_VARIANTS):
    """Every reading of W' = J_D W J_E^-1 for each role sharing this input. Per reading, the input
    scale a is chosen from families x grid on the selection tokens Xs, and the output scale b
    (readings with an output-side J_D) per output column from feature_mean x GRID_B (the error is
    separable over output columns: this is the best b of the grid for each column).
    Returns {role: {reading: {rel_sel, rel_test, a_family, a_c[, b_c_median]}}}."""
    def one(fam, c):  # numpy releases the GIL in its loops: two of these run at once
        out = []
        a = scales(Xf, fam, c)
        Zs = enc(Xs, a).astype(np.float32)
        zmean = enc(Xf, a).mean(0, dtype=np.float64)
        for r, W in Ws.items():
            Wt, ybar, off, offm = transport_prep(Xf, a, W, zmean)
            Q = Zs @ Wt
            Y = Yss[r]
            mabs = np.maximum(np.mean(np.abs(Yfs[r]), axis=0, dtype=np.float64), 1e-12)
            for v in variants:
                if v in Y_VARIANTS:
                    e, cb = colerr2(transport_predict(v, Q, ybar, off, offm, None), Y).sum(), None
                else:
                    errs = np.stack([colerr2(transport_predict(v, Q, ybar, off, offm, x / mabs), Y) for x in GRID_B])
                    ib = np.argmin(errs, axis=0)
                    e, cb = errs[ib, np.arange(errs.shape[1])].sum(), np.asarray(GRID_B)[ib]
                out.append((r, v, e, fam, c, cb))
        return out

    best = {}
    with ThreadPoolExecutor(2) as ex:  # results merged in grid order: deterministic
        for out in ex.map(lambda fc: one(*fc), [(f, c) for f in families for c in grid]):
            for r, v, e, fam, c, cb in out:
                if np.isfinite(e) and ((r, v) not in best or e < best[(r, v)][0]):
                    best[(r, v)] = (e, fam, c, cb)
    res = {r: {} for r in Ws}
    for (r, v), (e, fam, c, cb) in best.items():
        a = scales(Xf, fam, c)
        Wt, ybar, off, offm = transport_prep(Xf, a, Ws[r])
        mabs = np.maximum(np.mean(np.abs(Yfs[r]), axis=0, dtype=np.float64), 1e-12)
        Yh = transport_predict(v, enc(Xt, a).astype(np.float32) @ Wt, ybar, off, offm, None if cb is None else cb / mabs)
        d = {"rel_sel": float(np.sqrt(e / np.sum(Yss[r].astype(np.float64) ** 2))), "rel_test": rel(Yh, Yts[r]),
             "a_family": fam, "a_c": c}
        if cb is not None:
            d["b_c_median"] = float(np.median(cb))
        res[r][v] = d
    return res


# ------------------------------------------------------------------------------ best affine map
def affine_bound(Xf, Xv, Xt, Ws, Yfs, Yvs, Yts, colsets, families=FAMILIES, grid=GRID_LS):
    """(M, b) = argmin ||E(X_fit) M + b - X_fit W||_F^2 + ridge ||M||^2 for every scale in
    families x grid and the limit a -> 0 (sign(x)), with a x2 refinement around a winner inside
    the grid; scale and ridge chosen on the validation tokens Xv; reported on fit and test tokens.
    colsets: {name: (role, column slice)} evaluated separately (e.g. the V columns of qkv).
    Returns {name: {rel_fit, rel_val, rel_test, a_family, a_c, ridge, curve}}."""
    xm = Xf.mean(0, dtype=np.float64)
    Xc = (Xf - xm).astype(np.float32)
    K = Xf.shape[1]
    Ntot = sum(W.shape[1] for W in Ws.values())
    best, curve, tried = {}, {name: {} for name in colsets}, set()

    def run(fam, c):
        if (fam, c) in tried:
            return
        tried.add((fam, c))
        a = scales(Xf, fam, c)
        Zc = enc(Xf, a)  # float32: a |x| down to ~1e-5 still resolved against the sign
        zm = Zc.mean(0, dtype=np.float64)
        Zc -= zm.astype(np.float32)
        G = (Zc.T @ Zc).astype(np.float64)
        if Ntot > K:  # Zc^T Yc = (Zc^T Xc) W: cheaper when N > K
            ZX = (Zc.T @ Xc).astype(np.float64)
            Cs = {r: ZX @ W.astype(np.float64) for r, W in Ws.items()}
        else:
            Cs = {r: (Zc.T @ (Xc @ W)).astype(np.float64) for r, W in Ws.items()}
        del Zc
        tr = np.trace(G) / K
        Zv = enc(Xv, a) - zm.astype(np.float32)
        ev, V = np.linalg.eigh(G)  # G + l I = V (ev + l) V^T: every ridge from one eigh and GEMMs
        VtC = {r: V.T @ C for r, C in Cs.items()}
        for lam in RIDGES:
            Ms = {r: V @ (VC / (np.maximum(ev, 0) + lam * tr)[:, None]) for r, VC in VtC.items()}
            for name, (r, cols) in colsets.items():
                M = Ms[r][:, cols]
                ym = xm @ Ws[r][:, cols].astype(np.float64)  # mean of Y_fit; the intercept is ym - zm M
                e = rel(Zv @ M.astype(np.float32) + ym, Yvs[r][:, cols])
                key = f"{fam}:{c:g}"
                curve[name][key] = min(curve[name].get(key, np.inf), e)
                if name not in best or e < best[name]["rel_val"]:
                    best[name] = {"rel_val": e, "a_family": fam, "a_c": c, "ridge": lam, "_M": M, "_zm": zm, "_ym": ym}

    run(*LIMIT)
    for fam in families:
        for c in grid:
            run(fam, c)
    for name in list(best):  # refine around a winner inside the grid
        fam, c = best[name]["a_family"], best[name]["a_c"]
        if fam != LIMIT[0]:
            for f in (0.5, 2.0):
                run(fam, c * f)
    for name, d in best.items():
        r, cols = colsets[name]
        a = scales(Xf, d["a_family"], d["a_c"])
        M, zm, ym = d.pop("_M"), d.pop("_zm"), d.pop("_ym")
        d["rel_fit"] = rel((enc(Xf.astype(np.float64), a) - zm) @ M + ym, Yfs[r][:, cols])
        d["rel_test"] = rel((enc(Xt.astype(np.float64), a) - zm) @ M + ym, Yts[r][:, cols])
        d["curve_val"] = curve[name]
    return best


# ----------------------------------------------------------------------------------- spread
def nonlinear_share(X, a):
    """Share of the activations' variance that no per-feature affine function of z = E(x) explains:
    sum_k var(x_k) (1 - corr(x_k, z_k)^2) / sum_k var(x_k)."""
    Z = enc(X, a)
    xc, zc = X - X.mean(0, dtype=np.float64).astype(X.dtype), Z - Z.mean(0, dtype=np.float64).astype(X.dtype)
    vx, vz, cov = (np.einsum("tk,tk->k", u, w, dtype=np.float64) for u, w in ((xc, xc), (zc, zc), (xc, zc)))
    r2 = np.where(vz > 0, cov * cov / np.maximum(vx * vz, 1e-300), 0.0)  # a feature of constant code explains nothing
    return float(((1 - r2) * vx).sum() / vx.sum())


def spread_stats(Xf):
    """How far from affine E is on these activations: the nonlinear share at its best scale
    (feature_mean x GRID_LS and the limit a -> 0), the share of entries on the other side of zero
    from their feature's mean (there E jumps between -1 and +1), median std/|mean| per feature."""
    shares = {f"{LIMIT[0]}": nonlinear_share(Xf, None)}
    for c in GRID_LS:
        shares[f"feature_mean:{c:g}"] = nonlinear_share(Xf, scales(Xf, "feature_mean", c))
    shares["feature_mean:16"] = nonlinear_share(Xf, scales(Xf, "feature_mean", 16.0))
    k = min(shares, key=shares.get)
    m = Xf.mean(0, dtype=np.float64)
    cross = float(np.mean((Xf >= 0) != (m >= 0)))
    cv = Xf.std(0, dtype=np.float64) / np.maximum(np.abs(m), 1e-12)
    return {"nonlinear_var_share": shares[k], "nonlinear_at": k, "nonlinear_by_scale": shares,
            "off_mean_sign_share": cross, "median_std_over_abs_mean": float(np.median(cv))}


def spread_sweep(Xf, Xv, Xt, W, lambdas, nsel):
    """Shrink the activations towards their mean, X_l = xbar + l (X - xbar), and measure the
    linearized transport and the best affine map (scales over feature_mean x grid and a -> 0),
    relative to the output's deviation from its mean, ||Y_hat - Y|| / ||Y - ybar|| (the offsets
    give ybar for free, so shrinking alone would flatter ||.|| / ||Y||)."""
    xbar = Xf.mean(0, dtype=np.float64).astype(np.float32)
    ybar = xbar.astype(np.float64) @ W
    out = []
    for lam in lambdas:
        f, v, t = (xbar + np.float32(lam) * (X - xbar) for X in (Xf, Xv, Xt))
        Yf, Yv, Yt = f @ W, v @ W, t @ W
        tr = transport(f, v[:nsel], t, {"r": W}, {"r": Yf}, {"r": Yv[:nsel]}, {"r": Yt}, families=("feature_mean",),
                       variants=("lin_y", "lin_y_meancode"))["r"]
        lin = min(tr.values(), key=lambda d: d["rel_test"])
        ls = affine_bound(f, v, t, {"r": W}, {"r": Yf}, {"r": Yv}, {"r": Yt}, {"r": ("r", slice(None))},
                          families=("feature_mean",))["r"]
        dev_t = np.linalg.norm(Yt) / np.linalg.norm(Yt - ybar)  # ||.||/||Y|| -> ||.||/||Y - ybar||
        dev_f = np.linalg.norm(Yf) / np.linalg.norm(Yf - ybar)
        st = spread_stats(f)
        out.append({"lambda": lam, "linearized_rel_dev": lin["rel_test"] * dev_t, "affine_rel_dev": ls["rel_test"] * dev_t,
                    "affine_fit_rel_dev": ls["rel_fit"] * dev_f, "affine_a": f"{ls['a_family']}:{ls['a_c']:g}",
                    "nonlinear_var_share": st["nonlinear_var_share"], "off_mean_sign_share": st["off_mean_sign_share"]})
    return out


# -------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "work/smollm2"))
    ap.add_argument("--text", default=os.environ.get("QINS_WIKI_TEXT", os.path.join(ROOT, ".deps/text/summaries_en-us.json")))
    ap.add_argument("--pattern-a", default="work/smollm2-qins-q8-g128,work/smollm2-qins-q4-g32",
                    help="rewritten QINS models (comma separated, from `qins rewrite`) whose decoded codes give the Pattern A error")
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--fit-tokens", type=int, default=8192)
    ap.add_argument("--val-tokens", type=int, default=2048)
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--sel-tokens", type=int, default=256, help="validation tokens used to pick the transport's scales")
    ap.add_argument("--max-seq", type=int, default=256, help="tokens per article at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread-layer", type=int, default=10, help="layer of the spread sweep (o_proj, gate); -1: none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    layers = [int(s) for s in args.layers.split(",")]

    mats, (nq, nk), cfg = load_model(args.model, layers)
    sets = split_text(args.text, os.path.join(args.model, "tokenizer.json"), args.seed, args.fit_tokens,
                      args.val_tokens, args.test_tokens, args.max_seq)
    names = sorted({v[0] for v in mats.values()})
    acts = capture(args.model, names, cfg, [[ids for _, ids in s] for s in sets])
    ntok = [sum(len(ids) for _, ids in s) for s in sets]
    log(f"captured {len(names)} activation tensors: fit {ntok[0]} tokens / {len(sets[0])} articles, "
        f"val {ntok[1]} / {len(sets[1])}, test {ntok[2]} / {len(sets[2])} ({time.time() - t0:.0f} s)")

    pa = {}
    for qd in [p for p in args.pattern_a.split(",") if p]:
        qd = qd if os.path.isabs(qd) else os.path.join(ROOT, qd)
        if not os.path.exists(os.path.join(qd, "model.onnx")):
            log(f"{qd}: missing, its Pattern A column is left out (make it with `qins rewrite`)")
            continue
        w, fmt = pattern_a_weights(qd, layers)
        pa[f"q{fmt[0]}-g{fmt[1]}"] = w

    rows, spread = [], []
    for i in layers:
        groups = {}
        for role in ROLES:
            groups.setdefault(mats[(i, role)][0], []).append(role)
        for xname, roles in groups.items():
            Xf, Xv, Xt = (A[xname] for A in acts)
            Ws = {r: mats[(i, r)][1] for r in roles}
            Yf = {r: Xf @ W for r, W in Ws.items()}
            Yv = {r: Xv @ W for r, W in Ws.items()}
            Yt = {r: Xt @ W for r, W in Ws.items()}
            colsets, ns = {}, args.sel_tokens
            for r in roles:
                colsets[r] = (r, slice(None))
                if r == "qkv":
                    colsets["qkv_v"] = (r, slice(nq + nk, None))
            t1 = time.time()
            tr = transport(Xf, Xv[:ns], Xt, Ws, Yf, {r: y[:ns] for r, y in Yv.items()}, Yt)
            if "qkv" in roles:  # the V columns alone (scales chosen for them)
                v0 = nq + nk
                tr.update(transport(Xf, Xv[:ns], Xt, {"qkv_v": Ws["qkv"][:, v0:]}, {"qkv_v": Yf["qkv"][:, v0:]},
                                    {"qkv_v": Yv["qkv"][:ns, v0:]}, {"qkv_v": Yt["qkv"][:, v0:]}))
            t2 = time.time()
            ls = affine_bound(Xf, Xv, Xt, Ws, Yf, Yv, Yt, colsets)
            t3 = time.time()
            st = spread_stats(Xf)
            for name, (r, cols) in colsets.items():
                W = Ws[r][:, cols]
                Y = Yt[r][:, cols]
                # the reading with the lowest held-out error (an oracle choice, in Pattern B's favour)
                asw = min((k for k in tr[name] if k.startswith("lit_JD_")), key=lambda k: tr[name][k]["rel_test"])
                litk = min((k for k in tr[name] if k.startswith("lit")), key=lambda k: tr[name][k]["rel_test"])
                link = min((k for k in tr[name] if k.startswith("lin")), key=lambda k: tr[name][k]["rel_test"])
                ybar = Xf.mean(0, dtype=np.float64) @ W
                row = {
                    "layer": i, "role": name, "K": int(W.shape[0]), "N": int(W.shape[1]), "activation": xname,
                    "mean_only": rel(np.broadcast_to(ybar, Y.shape), Y),
                    "as_written_best": {"reading": asw, **tr[name][asw]},
                    "literal_best": {"reading": litk, **tr[name][litk]},
                    "linearized_best": {"reading": link, **tr[name][link]},
                    "transport_readings": tr[name],
                    "affine": ls[name],
                    "spread": st,
                    "pattern_a": {},
                }
                for fmt, w in pa.items():
                    if name == "qkv_v":
                        Wa = w.get((i, "qkv"))
                    elif name == "qkv":  # Q and K stay float in the product, V is QINS
                        Wa = None if (i, "qkv") not in w else np.concatenate([W[:, :nq + nk], w[(i, "qkv")]], axis=1)
                    else:
                        Wa = w.get((i, name))
                    if Wa is not None:
                        row["pattern_a"][fmt] = {"rel_test": rel(Xt @ Wa, Y), "weight_rel": rel(Wa, W)}
                rows.append(row)
                log(f"layer {i:2d} {name:6s} {W.shape[0]}x{W.shape[1]}: literal {tr[name][litk]['rel_test']:.3f} ({litk}) "
                    f"linearized {tr[name][link]['rel_test']:.3f} ({link}) affine fit {ls[name]['rel_fit']:.3f} "
                    f"test {ls[name]['rel_test']:.3f} ({ls[name]['a_family']}:{ls[name]['a_c']:g}) mean-only {row['mean_only']:.3f} "
                    + " ".join(f"A {k} {v['rel_test']:.2e}" for k, v in row["pattern_a"].items()))
            log(f"  ({', '.join(roles)}: transport {t2 - t1:.0f} s, affine {t3 - t2:.0f} s)")
        if i == args.spread_layer:
            for r in ("o_proj", "gate"):
                xn = mats[(i, r)][0]
                sw = spread_sweep(acts[0][xn], acts[1][xn], acts[2][xn], mats[(i, r)][1], [1.0, 0.1, 0.01, 0.001],
                                  args.sel_tokens)
                spread.append({"layer": i, "role": r, "sweep": sw})
                log(f"  spread sweep layer {i} {r}: " + ", ".join(
                    f"l={s['lambda']}: lin {s['linearized_rel_dev']:.3f} aff {s['affine_rel_dev']:.3f}" for s in sw))

    fmts = list(pa)
    print(f"SmolLM2-135M-Instruct, relative output error ||Y_hat - Y||_F / ||Y||_F on {ntok[2]} held-out tokens "
          f"({len(sets[2])} articles); affine map fit on {ntok[0]} tokens ({len(sets[0])} articles)")
    print(f"{'layer':>5} {'role':6} {'K x N':>9} {'written':>8} {'literal':>8} {'lineariz':>8} {'aff fit':>8} {'aff test':>8} "
          f"{'mean-only':>9} {'nonlin':>6} {'x-sign':>6} " + " ".join(f"{'A ' + f:>10}" for f in fmts))
    for r in rows:
        print(f"{r['layer']:>5} {r['role']:6} {str(r['K']) + 'x' + str(r['N']):>9} {r['as_written_best']['rel_test']:8.3f} "
              f"{r['literal_best']['rel_test']:8.3f} "
              f"{r['linearized_best']['rel_test']:8.3f} {r['affine']['rel_fit']:8.3f} {r['affine']['rel_test']:8.3f} "
              f"{r['mean_only']:9.3f} {r['spread']['nonlinear_var_share']:6.2f} {r['spread']['off_mean_sign_share']:6.2f} "
              + " ".join(f"{r['pattern_a'][f]['rel_test']:10.2e}" if f in r["pattern_a"] else f"{'-':>10}" for f in fmts))
    for key, lab in (("as_written_best", "J_D W J_E^-1 as written"), ("literal_best", "literal transport"), ("linearized_best", "linearized transport"), ("affine", "best affine map")):
        v = [r[key]["rel_test"] for r in rows]
        print(f"{lab:>23}, held-out: min {min(v):.3f}  median {float(np.median(v)):.3f}  max {max(v):.3f}")
    for f in fmts:
        v = [r["pattern_a"][f]["rel_test"] for r in rows if f in r["pattern_a"]]
        print(f"{'Pattern A ' + f:>23}, held-out: min {min(v):.2e}  median {float(np.median(v)):.2e}  max {max(v):.2e}")
    if spread:
        print(f"spread sweep, layer {args.spread_layer}: X -> xbar + l (X - xbar); error / ||Y - ybar|| on held-out tokens")
        print(f"  {'role':6} {'lambda':>6} {'lineariz':>8} {'aff fit':>8} {'aff test':>8} {'nonlin':>6} {'x-sign':>6}  affine a")
        for s in spread:
            for w in s["sweep"]:
                print(f"  {s['role']:6} {w['lambda']:6g} {w['linearized_rel_dev']:8.3f} {w['affine_fit_rel_dev']:8.3f} "
                      f"{w['affine_rel_dev']:8.3f} {w['nonlinear_var_share']:6.2f} {w['off_mean_sign_share']:6.2f}  {w['affine_a']}")
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        out = {"args": vars(args), "tokens": {"fit": ntok[0], "val": ntok[1], "test": ntok[2]},
               "articles": {k: [t for t, _ in s] for k, s in zip(("fit", "val", "test"), sets)},
               "families": FAMILIES, "grid_transport": GRID_T, "grid_output_b": GRID_B, "grid_affine": GRID_LS,
               "ridges": RIDGES, "rows": rows, "spread_sweep": spread, "seconds": time.time() - t0}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
