// fp32 window attention (see window_attention.hpp). Every product is one small GEMM on token-major
// buffers of one window, written with GCC/Clang vector types of 16 floats: the compiler maps them onto
// the widest SIMD unit of the target (-march) and keeps each tile's accumulators in registers.
#include "window_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace effvit {
namespace {

constexpr int L = 16;  // floats per vector
typedef float vf __attribute__((vector_size(L * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(L * sizeof(int32_t))));

inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{} + s; }

// exp of a vector of x <= 0 (scores minus their row's max): 2^k * e^r with |r| <= ln2 / 2, e^r by its
// Taylor series to r^7 (relative error below 1e-8 there); 0 below -87 (the masked keys are -inf): exactly 0,
// since e^-87 divided by a row sum would be a denormal, slow in every later product.
inline vf vexp(vf x) {
    const vf lo = splat(-87.0f);
    const vf xc = x < lo ? lo : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting rounds to an integer
    vf k = (xc * 1.44269504088896341f + magic) - magic;
    vf r = xc - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    vf p = splat(1.0f / 5040);
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < lo ? vf{} : p * scale;
}

// horizontal max and sum by halving: log2(16) vector steps, not 16 dependent scalar ones
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

template <typename Op>
inline float reduce(vf v, Op op) {
    vf8 a, b;
    std::memcpy(&a, &v, sizeof a);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
    a = op(a, b);
    vf4 c, d;
    std::memcpy(&c, &a, sizeof c);
    std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
    c = op(c, d);
    return op(op(c[0], c[1]), op(c[2], c[3]));
}
inline float hmax(vf v) {
    return reduce(v, [](auto x, auto y) { return x > y ? x : y; });
}
inline float hsum(vf v) {
    return reduce(v, [](auto x, auto y) { return x + y; });
}

// C[R x 16V] = A[R x k] B[k x 16V] (+ bias row) (+ add): a register tile.
template <int R, int V>
inline void tile(int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, const float* bias,
                 const float* add, int64_t ldadd, float* C, int64_t ldc) {
    vf acc[R][V];
    for (int v = 0; v < V; ++v) {
        vf b0 = bias ? load(bias + v * L) : vf{};
        for (int r = 0; r < R; ++r) acc[r][v] = b0;
    }
    for (int64_t p = 0; p < k; ++p) {
        vf b[V];
        for (int v = 0; v < V; ++v) b[v] = load(B + p * ldb + v * L);
        for (int r = 0; r < R; ++r) {
            const float a = A[r * lda + p];
            for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) {
            vf c = acc[r][v];
            if (add) c += load(add + r * ldadd + v * L);
            store(C + r * ldc + v * L, c);
        }
}

template <int V>
inline void rows(int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                 const float* bias, const float* add, int64_t ldadd, float* C, int64_t ldc) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        tile<4, V>(k, A + i * lda, lda, B, ldb, bias, add ? add + i * ldadd : nullptr, ldadd, C + i * ldc, ldc);
    const float* ai = A + i * lda;
    const float* addi = add ? add + i * ldadd : nullptr;
    switch (n - i) {
        case 3: tile<3, V>(k, ai, lda, B, ldb, bias, addi, ldadd, C + i * ldc, ldc); break;
        case 2: tile<2, V>(k, ai, lda, B, ldb, bias, addi, ldadd, C + i * ldc, ldc); break;
        case 1: tile<1, V>(k, ai, lda, B, ldb, bias, addi, ldadd, C + i * ldc, ldc); break;
        default: break;
    }
}

// C[n x m] = A[n x k] B[k x m] + bias[m] (optional) + add[n x m] (optional); row strides given.
void gemm(int64_t n, int64_t k, int64_t m, const float* A, int64_t lda, const float* B, int64_t ldb,
          const float* bias, const float* add, int64_t ldadd, float* C, int64_t ldc) {
    int64_t j = 0;
    for (; j + 4 * L <= m; j += 4 * L)
        rows<4>(n, k, A, lda, B + j, ldb, bias ? bias + j : nullptr, add ? add + j : nullptr, ldadd, C + j, ldc);
    const float* bj = bias ? bias + j : nullptr;
    const float* addj = add ? add + j : nullptr;
    switch ((m - j) / L) {
        case 3: rows<3>(n, k, A, lda, B + j, ldb, bj, addj, ldadd, C + j, ldc); break;
        case 2: rows<2>(n, k, A, lda, B + j, ldb, bj, addj, ldadd, C + j, ldc); break;
        case 1: rows<1>(n, k, A, lda, B + j, ldb, bj, addj, ldadd, C + j, ldc); break;
        default: break;
    }
    j += (m - j) / L * L;
    for (; j < m; ++j)  // columns past the last full vector (no variant has any)
        for (int64_t i = 0; i < n; ++i) {
            float s = bias ? bias[j] : 0.0f;
            for (int64_t p = 0; p < k; ++p) s += A[i * lda + p] * B[p * ldb + j];
            C[i * ldc + j] = add ? s + add[i * ldadd + j] : s;
        }
}

// Depthwise k x k conv (zero padding at the window's edges) of q, token-major (N, kd) with row stride ldq,
// into Q (N, kd); w: (kmax, kmax, kd) with the k x k kernel centred. q is first copied into a zero-bordered
// grid (pad, kd a multiple of L) so that the taps need no bounds checks; each output row of up to 8
// tokens accumulates in registers.
void q_conv(const WindowGrid& g, int64_t kd, int64_t k, int64_t kmax, const float* q, int64_t ldq, const float* w,
            const float* b, float* Q, std::vector<float>& pad) {
    const int64_t half = k / 2, off = (kmax - k) / 2;
    const int64_t pw = g.ww + 2 * half + 8, ph = g.wh + 2 * half;  // 8 columns of slack for the last chunk
    pad.assign(ph * pw * kd, 0.0f);
    for (int64_t y = 0; y < g.wh; ++y)
        for (int64_t x = 0; x < g.ww; ++x)
            std::memcpy(&pad[((y + half) * pw + x + half) * kd], q + (y * g.ww + x) * ldq, kd * sizeof(float));
    for (int64_t c = 0; c < kd; c += L)
        for (int64_t y = 0; y < g.wh; ++y)
            for (int64_t x0 = 0; x0 < g.ww; x0 += 8) {
                vf acc[8];
                const vf bias = load(b + c);
                for (int t = 0; t < 8; ++t) acc[t] = bias;
                for (int64_t dy = 0; dy < k; ++dy)
                    for (int64_t dx = 0; dx < k; ++dx) {
                        const vf wv = load(w + ((dy + off) * kmax + dx + off) * kd + c);
                        const float* src = &pad[((y + dy) * pw + x0 + dx) * kd + c];
                        for (int t = 0; t < 8; ++t) acc[t] += wv * load(src + t * kd);
                    }
                const int64_t cnt = std::min<int64_t>(8, g.ww - x0);
                for (int64_t t = 0; t < cnt; ++t) store(Q + (y * g.ww + x0 + t) * kd + c, acc[t]);
            }
}

// Row-wise softmax of S (n, P) in place; P is a multiple of L, masked keys hold -inf.
void softmax_rows(int64_t n, int64_t P, float* S) {
    for (int64_t i = 0; i < n; ++i) {
        float* s = S + i * P;
        vf m = load(s);
        for (int64_t j = L; j < P; j += L) {
            vf v = load(s + j);
            m = v > m ? v : m;
        }
        const vf mx = splat(hmax(m));
        vf sum{};
        for (int64_t j = 0; j < P; j += L) {
            vf e = vexp(load(s + j) - mx);
            sum += e;
            store(s + j, e);
        }
        const float inv = 1.0f / hsum(sum);
        for (int64_t j = 0; j < P; j += L) store(s + j, load(s + j) * inv);
    }
}

// Denormals flushed to zero while a call runs (restored after): a probability or product below 1e-38
// changes no output above rounding, and each denormal costs a microcode assist on x86.
struct FlushDenormals {
#if defined(__SSE__)
    unsigned saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ and DAZ
    ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct Scratch {
    std::vector<float> X, in, T, Q, kT, S, Y, Z, pad;
};

}  // namespace

WindowGrid window_grid(int64_t height, int64_t width, int64_t window) {
    if (height <= window && width <= window) return {height, width, 1, 1};
    return {window, window, (height + window - 1) / window, (width + window - 1) / window};
}

int64_t work_items(const WindowAttentionArgs& a) {
    const WindowGrid g = window_grid(a.height, a.width, a.window);
    return a.batch * g.nh * g.nw;
}

void window_bias(const WindowAttentionArgs& a, float* bias) {
    const WindowGrid g = window_grid(a.height, a.width, a.window);
    const int64_t N = g.tokens(), P = g.padded(), r = a.window;
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t h = 0; h < a.heads; ++h)
        for (int64_t i = 0; i < N; ++i) {
            float* row = bias + (h * N + i) * P;
            const int64_t yi = i / g.ww, xi = i % g.ww;
            for (int64_t j = 0; j < N; ++j) {
                const int64_t yj = j / g.ww, xj = j % g.ww;
                row[j] = a.table[h * r * r + std::abs(yi - yj) * r + std::abs(xi - xj)];
            }
            for (int64_t j = N; j < P; ++j) row[j] = ninf;
        }
}

void run_windows(const WindowAttentionArgs& a, const float* bias, int64_t begin, int64_t end) {
    const WindowGrid g = window_grid(a.height, a.width, a.window);
    const int64_t N = g.tokens(), P = g.padded(), C = a.channels, H = a.height, W = a.width;
    const int64_t h = a.heads, kd = a.key_dim, d = a.val_dim, e = 2 * kd + d, hd = h * d;
    const FlushDenormals flush;
    thread_local Scratch s;  // reused across calls: no allocation once the largest block has run
    s.X.resize(N * C);
    s.in.resize(N * d);
    s.T.resize(N * e);
    s.Q.resize(N * kd);
    s.kT.resize(kd * P);
    s.S.resize(N * P);
    s.Y.resize(N * hd);
    s.Z.resize(N * C);
    float *X = s.X.data(), *in = s.in.data(), *T = s.T.data(), *Q = s.Q.data(), *kT = s.kT.data();
    float *S = s.S.data(), *Y = s.Y.data(), *Z = s.Z.data();
    std::fill(kT, kT + kd * P, 0.0f);  // padding keys stay 0 (their scores are masked by the bias)

    for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (g.nh * g.nw), wi = item % (g.nh * g.nw);
        const int64_t y0 = wi / g.nw * g.wh, x0 = wi % g.nw * g.ww;
        const float* xb = a.x + b * C * H * W;
        // the window's tokens, (N, C), zeros where the window hangs over the map; channels in blocks of 16:
        // 16 rows read, one line of X written per token
        for (int64_t c0 = 0; c0 < C; c0 += L) {
            const int64_t cn = std::min<int64_t>(L, C - c0);
            for (int64_t y = 0; y < g.wh; ++y) {
                const int64_t yy = y0 + y;
                for (int64_t x = 0; x < g.ww; ++x) {
                    const int64_t xx = x0 + x;
                    float* dst = X + (y * g.ww + x) * C + c0;
                    if (yy < H && xx < W) {
                        const float* src = xb + (c0 * H + yy) * W + xx;
                        for (int64_t c = 0; c < cn; ++c) dst[c] = src[c * H * W];
                    } else {
                        for (int64_t c = 0; c < cn; ++c) dst[c] = 0.0f;
                    }
                }
            }
        }
        for (int64_t i = 0; i < h; ++i) {
            // head i's input: its channel chunk plus the previous head's output
            for (int64_t n = 0; n < N; ++n) {
                const float* xc = X + n * C + i * d;
                float* dst = in + n * d;
                if (i == 0) {
                    std::memcpy(dst, xc, d * sizeof(float));
                } else {
                    const float* prev = Y + n * hd + (i - 1) * d;
                    for (int64_t c = 0; c < d; ++c) dst[c] = xc[c] + prev[c];
                }
            }
            gemm(N, d, e, in, d, a.qkv_w + i * d * e, e, a.qkv_b + i * e, nullptr, 0, T, e);
            q_conv(g, kd, a.kernels[i], a.kmax, T, e, a.q_w + i * a.kmax * a.kmax * kd, a.q_b + i * kd, Q, s.pad);
            for (int64_t n = 0; n < N; ++n)
                for (int64_t j = 0; j < kd; ++j) kT[j * P + n] = T[n * e + kd + j];
            gemm(N, kd, P, Q, kd, kT, P, nullptr, bias + i * N * P, P, S, P);
            softmax_rows(N, P, S);
            gemm(N, N, d, S, P, T + 2 * kd, e, nullptr, nullptr, 0, Y + i * d, hd);
        }
        for (int64_t j = 0; j < N * hd; ++j) Y[j] = std::max(Y[j], 0.0f);
        gemm(N, hd, C, Y, hd, a.proj_w, C, a.proj_b, a.skip ? X : nullptr, C, Z, C);
        float* ob = a.out + b * C * H * W;
        for (int64_t c0 = 0; c0 < C; c0 += L) {
            const int64_t cn = std::min<int64_t>(L, C - c0);
            for (int64_t y = 0; y < g.wh && y0 + y < H; ++y)
                for (int64_t x = 0; x < g.ww && x0 + x < W; ++x) {
                    const float* src = Z + (y * g.ww + x) * C + c0;
                    float* dst = ob + (c0 * H + y0 + y) * W + x0 + x;
                    for (int64_t c = 0; c < cn; ++c) dst[c * H * W] = src[c];
                }
        }
    }
}

}  // namespace effvit
