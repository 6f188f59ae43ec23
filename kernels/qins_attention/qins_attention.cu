// com.qins.QinsGroupQueryAttention on the GPU: GroupQueryAttention over a float K cache and a
// QINS-coded V cache (docs/FORMAT.md, "The V cache"; the CPU kernel in
// provider/src/cpu/qins_attention is the reference these are checked against).
//
// Contract (all kernels)
// - T is float or __half. Query [B, S, (H + 2 KVH) D] packed, or Q [B, S, H D] with K and V
//   [B, S, KVH D] (k_in/v_in non-null). present_key [B, KVH, P, D] T, present_value
//   [B, KVH, P, R] bytes, R = D * BITS / 8 + 4 (codes, then the row's f32 scale). D % 8 == 0,
//   D <= 512.
// - Sequence b holds total_b = seqlens_k[b] + 1 tokens after the run; first_prompt (S equals
//   total_sequence_length) means it held none before, else it held total_b - S. seqlens_k
//   lives on the device (the graph computes it), so a value the run cannot hold is skipped
//   here, not trusted: a sequence whose total_b exceeds L = min(total_sequence_length, P)
//   (checked on the host, like the rotary caches against it) is not run, so no row outside
//   [0, L) is read or written and no rotary position reaches L. A shared buffer's P can be far
//   larger than L (genai's static cache), and its rotary caches need only cover L.
// - One warp per row (store) or per (query, head, split of the keys) (attend); no block-wide
//   synchronisation, no atomics. Every launch is on ORT's stream; nothing is allocated here.
// - V rows are encoded as qins::codec::kv::encode_v_row does (same grid, ratios, Lloyd step,
//   f32 arithmetic); sums over the row are warp reductions, so a scale can differ from the
//   CPU's in the last bit and, on a near tie, pick the neighbouring candidate: the checks
//   compare decoded rows by normalized error, not bytes.
#include "../common/qins_common.cuh"

namespace {

constexpr int MAX_D = 512;
constexpr int WARP = 32;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sequence's cached tokens before this run and its total after it; false where seqlens_k
// does not fit the run (L: see the contract).
__device__ __forceinline__ bool lengths(const int* seqlens_k, int b, int S, int first_prompt, int L, int& past,
                                        int& total) {
    long long t = (long long)seqlens_k[b] + 1;
    if (first_prompt) {
        if (t < 1 || t > S) return false;
        past = 0;
        total = (int)t;
        return true;
    }
    if (t < S || t > L) return false;
    past = (int)t - S;
    total = (int)t;
    return true;
}

// Row `s` of head `head` of part 0 (Q), 1 (K) or 2 (V).
template <typename T>
__device__ __forceinline__ const T* in_row(const T* q_in, const T* k_in, const T* v_in, int part, int b, int s,
                                           int head, int S, int H, int KVH, int D) {
    if (k_in == nullptr) {
        int first = part == 0 ? 0 : (part == 1 ? H : H + KVH);
        return q_in + (((long long)b * S + s) * (H + 2 * KVH) + first + head) * D;
    }
    const T* src = part == 0 ? q_in : (part == 1 ? k_in : v_in);
    int width = part == 0 ? H : KVH;
    return src + (((long long)b * S + s) * width + head) * D;
}

// Rotary embedding of a row held in shared memory `x[D]`, at position `pos`, then rounded to
// T (as GroupQueryAttention stores rotated rows in the model's type).
template <typename T>
__device__ __forceinline__ void rope(float* x, const T* cos_c, const T* sin_c, int rot_dim, int interleaved,
                                     int pos, int D) {
    int lane = threadIdx.x & 31;
    if (rot_dim > 0) {
        int half = rot_dim / 2;
        for (int i = lane; i < half; i += WARP) {
            int a = interleaved ? 2 * i : i, bb = interleaved ? 2 * i + 1 : i + half;
            float c = to_f(cos_c[(long long)pos * half + i]), sn = to_f(sin_c[(long long)pos * half + i]);
            float xa = x[a], xb = x[bb];
            x[a] = xa * c - xb * sn;
            x[bb] = xb * c + xa * sn;
        }
        __syncwarp();
    }
    for (int d = lane; d < D; d += WARP) x[d] = to_f(from_f<T>(x[d]));
    __syncwarp();
}

// qins::codec::kv's nearest magnitude, the same float expression.
template <int BITS>
__device__ __forceinline__ int nearest(float y) {
    constexpr int MM = 1 << (BITS - 1);
    const float dz = (float)(0.5 / (MM - 1));
    const float inv_dz = (float)(1.0 / (0.5 / (MM - 1)));
    float t = y / (1.0f + y);
    float r = fminf(fmaxf((float)(int)(t * inv_dz), 0.0f), (float)(MM - 2));
    float t0 = r * dz, t1 = (r + 1.0f) * dz;
    float mid2 = t0 / (1.0f - t0) + t1 / (1.0f - t1);
    return (int)(r + (y + y > mid2 ? 1.0f : 0.0f));
}

// Squared error and Lloyd update of the row in `x[D]` at scale `s` (a warp's sums).
template <int BITS>
__device__ __forceinline__ void pass(const float* x, int D, float s, float& err, float& upd) {
    const float* lut = Fmt<BITS>::lut();
    int lane = threadIdx.x & 31;
    float inv = 1.0f / s, e = 0.f, xu = 0.f, uu = 0.f;
    for (int d = lane; d < D; d += WARP) {
        float a = fabsf(x[d]);
        float u = lut[nearest<BITS>(a * inv)];
        float df = a - u * s;
        e += df * df;
        xu += a * u;
        uu += u * u;
    }
    err = warp_sum(e);
    xu = warp_sum(xu);
    uu = warp_sum(uu);
    upd = uu > 0.f ? xu / uu : s;
}

// Encodes the row in `x[D]` into `row` (R bytes): qins::codec::kv::encode_v_row.
template <int BITS>
__device__ __forceinline__ void encode_row(const float* x, int D, uint8_t* row) {
    int lane = threadIdx.x & 31;
    float m = 0.f;
    bool nan = false;
    for (int d = lane; d < D; d += WARP) {
        float a = fabsf(x[d]);
        nan |= !(a <= 3.402823466e38f);  // NaN or infinity
        m = fmaxf(m, a);
    }
    m = warp_max(m);
    nan = __any_sync(0xffffffffu, nan);
    int codes_len = D * BITS / 8;
    float* scale_at = reinterpret_cast<float*>(row + codes_len);
    if (nan || m == 0.f) {
        for (int i = lane; i < codes_len; i += WARP) row[i] = 0;
        if (lane == 0) *scale_at = nan ? __int_as_float(0x7fc00000) : 0.f;
        return;
    }
    const float r8[6] = {1.0f, 0.96f, 0.92f, 0.88f, 0.84f, 0.8f};
    const float r4[6] = {1.0f, 0.9f, 0.8f, 0.7f, 0.6f, 0.5f};
    float best_e = __int_as_float(0x7f800000), best_s = m, next = m;
    for (int k = 0; k < 6; k++) {
        float s = m * (BITS == 8 ? r8[k] : r4[k]);
        float e, upd;
        pass<BITS>(x, D, s, e, upd);
        if (e < best_e) {
            best_e = e;
            best_s = s;
            next = upd;
        }
    }
    if (isfinite(next) && next > 0.f && next != best_s) {
        float e, upd;
        pass<BITS>(x, D, next, e, upd);
        if (e < best_e) best_s = next;
    }
    float inv = 1.0f / best_s;
    constexpr int SIGN = 1 << (BITS - 1);
    auto code = [&](float v) {
        int c = nearest<BITS>(fabsf(v) * inv);
        return (v < 0.f && c != 0) ? (c | SIGN) : c;
    };
    if constexpr (BITS == 8) {
        for (int d = lane; d < D; d += WARP) row[d] = (uint8_t)code(x[d]);
    } else {
        for (int i = lane; i < D / 2; i += WARP) row[i] = (uint8_t)(code(x[2 * i]) | (code(x[2 * i + 1]) << 4));
    }
    if (lane == 0) *scale_at = best_s;
}

// Decoded element d of a V row.
template <int BITS>
__device__ __forceinline__ float v_at(const uint8_t* row, int d) {
    const float* lut = Fmt<BITS>::lut();
    if constexpr (BITS == 8) {
        return lut[row[d]];
    } else {
        uint8_t b = row[d >> 1];
        return lut[(d & 1) ? (b >> 4) : (b & 15)];
    }
}

// Phase 1: grid (S, KVH, B), one warp: new token s's K row rotated and stored, its V row
// encoded.
template <typename T, int BITS>
__device__ void store(const T* q_in, const T* k_in, const T* v_in, const int* seqlens_k, const T* cos_c,
                      const T* sin_c, T* present_key, uint8_t* present_value, int S, int H, int KVH, int D, int P,
                      int L, int first_prompt, int rot_dim, int interleaved) {
    __shared__ float x[MAX_D];
    int s = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, lane = threadIdx.x;
    int past, total;
    if (!lengths(seqlens_k, b, S, first_prompt, L, past, total)) return;
    int pos = past + s;
    if (pos >= L) return;
    int R = D * BITS / 8 + 4;
    long long row = ((long long)b * KVH + kvh) * P + pos;
    const T* k = in_row(q_in, k_in, v_in, 1, b, s, kvh, S, H, KVH, D);
    for (int d = lane; d < D; d += WARP) x[d] = to_f(k[d]);
    __syncwarp();
    rope<T>(x, cos_c, sin_c, rot_dim, interleaved, pos, D);
    for (int d = lane; d < D; d += WARP) present_key[row * D + d] = from_f<T>(x[d]);
    __syncwarp();
    const T* v = in_row(q_in, k_in, v_in, 2, b, s, kvh, S, H, KVH, D);
    for (int d = lane; d < D; d += WARP) x[d] = to_f(v[d]);
    __syncwarp();
    encode_row<BITS>(x, D, present_value + row * R);
}

// Separate past and present: grid (P, KVH, B), 32 threads: rows below the sequence's past
// copied, rows from past + S on zeroed (rows in between are the new ones, `store`'s).
__device__ void copy_past(const uint32_t* past_key, const uint32_t* past_value, const int* seqlens_k,
                          uint32_t* present_key, uint32_t* present_value, int S, int KVH, int P_past, int P,
                          int L, int first_prompt, int k_words, int v_words) {
    int pos = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    int past, total;
    if (!lengths(seqlens_k, b, S, first_prompt, L, past, total)) past = 0;
    if (past > P_past) past = P_past;
    if (pos >= past && pos < past + S) return;
    long long g = (long long)b * KVH + kvh;
    bool copy = pos < past;
    for (int i = threadIdx.x; i < k_words; i += blockDim.x)
        present_key[(g * P + pos) * k_words + i] = copy ? past_key[(g * P_past + pos) * k_words + i] : 0u;
    for (int i = threadIdx.x; i < v_words; i += blockDim.x)
        present_value[(g * P + pos) * v_words + i] = copy ? past_value[(g * P_past + pos) * v_words + i] : 0u;
}

// Phase 2: grid (B S, H, splits), one warp: the keys of split z that query (b, s) of head h
// sees; online softmax over them, 32 keys at a time (a lane scores one key, then the warp
// adds the 32 decoded V rows, each lane its dimensions). With one split the output is
// written here; otherwise (m, l, acc[D]) go to `part` for `combine`.
template <typename T, int BITS>
__device__ void attend(const T* q_in, const T* k_in, const T* v_in, const int* seqlens_k, const T* cos_c,
                       const T* sin_c, const T* present_key, const uint8_t* present_value, T* out, float* part,
                       int S, int H, int KVH, int D, int P, int L, int first_prompt, int rot_dim, int interleaved,
                       float alpha, float softcap, int window, int splits) {
    __shared__ float q[MAX_D];
    int z = blockIdx.x, h = blockIdx.y, split = blockIdx.z, lane = threadIdx.x;
    int b = z / S, s = z % S;
    int kvh = h / (H / KVH);
    constexpr int DPL = MAX_D / WARP;  // dimensions per lane, at most
    float acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.f;
    float m = -__int_as_float(0x7f800000), l = 0.f;
    // A skipped sequence keeps past = 0: its rotary reads stay below S <= L, its output is 0.
    int past = 0, total = 0, start = 0, end = 0;
    if (lengths(seqlens_k, b, S, first_prompt, L, past, total)) {
        end = min(past + s + 1, total);
        if (window > 0 && end > window + 1) start = end - window - 1;
    }
    int n = end - start, per = (n + splits - 1) / splits;
    int k0 = start + split * per, k1 = min(k0 + per, end);
    const T* qr = in_row(q_in, k_in, v_in, 0, b, s, h, S, H, KVH, D);
    for (int d = lane; d < D; d += WARP) q[d] = to_f(qr[d]);
    __syncwarp();
    rope<T>(q, cos_c, sin_c, rot_dim, interleaved, past + s, D);
    int R = D * BITS / 8 + 4;
    long long g = (long long)b * KVH + kvh;
    const T* K = present_key + g * P * D;
    const uint8_t* V = present_value + g * P * R;
    for (int j0 = k0; j0 < k1; j0 += WARP) {
        int j = j0 + lane;
        float x = -__int_as_float(0x7f800000);
        if (j < k1) {
            const T* kr = K + (long long)j * D;
            float dot = 0.f;
            for (int d = 0; d < D; d++) dot += q[d] * to_f(kr[d]);
            x = alpha * dot;
            if (softcap > 0.f) x = softcap * tanhf(x / softcap);
        }
        float mj = warp_max(x);
        float m_new = fmaxf(m, mj);
        float corr = __expf(m - m_new);
        float p = j < k1 ? __expf(x - m_new) : 0.f;
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        int cnt = min(WARP, k1 - j0);
        for (int t = 0; t < cnt; t++) {
            float pt = __shfl_sync(0xffffffffu, p, t);
            const uint8_t* vr = V + (long long)(j0 + t) * R;
            float w = pt * *reinterpret_cast<const float*>(vr + D * BITS / 8);
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                int d = lane + i * WARP;
                if (d < D) acc[i] += w * v_at<BITS>(vr, d);
            }
        }
        m = m_new;
    }
    if (splits == 1) {
        float inv = l > 0.f ? 1.0f / l : 0.f;
        T* o = out + (((long long)b * S + s) * H + h) * D;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            int d = lane + i * WARP;
            if (d < D) o[d] = from_f<T>(acc[i] * inv);
        }
        return;
    }
    float* pp = part + (((long long)z * H + h) * splits + split) * (D + 2);
    if (lane == 0) {
        pp[0] = m;
        pp[1] = l;
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        int d = lane + i * WARP;
        if (d < D) pp[2 + d] = acc[i];
    }
}

// The splits of one (query, head) merged: grid (B S, H), one warp.
template <typename T>
__device__ void combine(const float* part, T* out, int S, int H, int D, int splits) {
    int z = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const float* pp = part + ((long long)z * H + h) * splits * (D + 2);
    float m = -__int_as_float(0x7f800000);
    for (int k = 0; k < splits; k++) m = fmaxf(m, pp[k * (D + 2)]);
    float l = 0.f;
    for (int k = 0; k < splits; k++) {
        float mk = pp[k * (D + 2)];
        if (mk > -__int_as_float(0x7f800000)) l += pp[k * (D + 2) + 1] * __expf(mk - m);
    }
    float inv = l > 0.f ? 1.0f / l : 0.f;
    int b = z / S, s = z % S;
    T* o = out + (((long long)b * S + s) * H + h) * D;
    for (int d = lane; d < D; d += WARP) {
        float a = 0.f;
        for (int k = 0; k < splits; k++) {
            float mk = pp[k * (D + 2)];
            if (mk > -__int_as_float(0x7f800000)) a += pp[k * (D + 2) + 2 + d] * __expf(mk - m);
        }
        o[d] = from_f<T>(a * inv);
    }
}

}  // namespace

#define QINS_ATTN(T, TN, BITS)                                                                                       \
    extern "C" __global__ void __launch_bounds__(32) qins_attn_store_##TN##_v##BITS(                                \
        const T* q_in, const T* k_in, const T* v_in, const int* seqlens_k, const T* cos_c, const T* sin_c,          \
        T* present_key, uint8_t* present_value, int S, int H, int KVH, int D, int P, int L, int first_prompt,      \
        int rot_dim, int interleaved) {                                                                             \
        store<T, BITS>(q_in, k_in, v_in, seqlens_k, cos_c, sin_c, present_key, present_value, S, H, KVH, D, P, L,  \
                       first_prompt, rot_dim, interleaved);                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(32) qins_attn_attend_##TN##_v##BITS(                               \
        const T* q_in, const T* k_in, const T* v_in, const int* seqlens_k, const T* cos_c, const T* sin_c,          \
        const T* present_key, const uint8_t* present_value, T* out, float* part, int S, int H, int KVH, int D,      \
        int P, int L, int first_prompt, int rot_dim, int interleaved, float alpha, float softcap, int window,       \
        int splits) {                                                                                               \
        attend<T, BITS>(q_in, k_in, v_in, seqlens_k, cos_c, sin_c, present_key, present_value, out, part, S, H,     \
                        KVH, D, P, L, first_prompt, rot_dim, interleaved, alpha, softcap, window, splits);          \
    }

QINS_ATTN(float, f32, 8)
QINS_ATTN(float, f32, 4)
QINS_ATTN(__half, f16, 8)
QINS_ATTN(__half, f16, 4)

extern "C" __global__ void __launch_bounds__(32)
    qins_attn_combine_f32(const float* part, float* out, int S, int H, int D, int splits) {
    combine<float>(part, out, S, H, D, splits);
}
extern "C" __global__ void __launch_bounds__(32)
    qins_attn_combine_f16(const float* part, __half* out, int S, int H, int D, int splits) {
    combine<__half>(part, out, S, H, D, splits);
}
extern "C" __global__ void __launch_bounds__(128)
    qins_attn_copy_past(const uint32_t* past_key, const uint32_t* past_value, const int* seqlens_k,
                        uint32_t* present_key, uint32_t* present_value, int S, int KVH, int P_past, int P, int L,
                        int first_prompt, int k_words, int v_words) {
    copy_past(past_key, past_value, seqlens_k, present_key, present_value, S, KVH, P_past, P, L, first_prompt,
              k_words, v_words);
}
