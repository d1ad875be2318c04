/* Fused CPU kernels for training DiT blocks (see dit/native.py, which builds and loads this file).
 *
 * ATen runs each of these as several passes over [tokens, channels] tensors (its bf16 tanh-GELU alone costs 4x the
 * matmul in front of it on a Sapphire Rapids core); here each is one pass, computed in fp32 and, for bf16 storage,
 * rounded to nearest even like ATen's reduced-precision kernels. All tensors are contiguous, row-major; bf16 is
 * passed as uint16_t. Every function splits its work over `nthreads` threads: OpenMP (torch's runtime) when built
 * with -fopenmp, POSIX threads otherwise.
 *
 * The tanh GELU is evaluated as u * sigmoid(2z), z = sqrt(2/pi) (u + 0.044715 u^3), which equals
 * 0.5 u (1 + tanh z) exactly in real arithmetic and avoids the cancellation of 1 + tanh z for z << 0.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DIT_AVX512 1
#endif

#define GELU_C0 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C1 0.044715f

/* ------------------------------------------------------------------------------------------------ threading */
typedef void (*range_fn)(void *args, int64_t begin, int64_t end);
typedef struct { range_fn fn; void *args; int64_t begin, end; } chunk_t;

#ifndef _OPENMP
static void *run_chunk(void *p) {
  chunk_t *c = (chunk_t *)p;
  c->fn(c->args, c->begin, c->end);
  return NULL;
}
#endif

/* Run fn over [0, n) in `nthreads` contiguous chunks whose bounds are multiples of `grain`. */
static void parallel_for(range_fn fn, void *args, int64_t n, int64_t grain, int nthreads) {
  if (nthreads > 64) nthreads = 64;
  int64_t units = (n + grain - 1) / grain;
  if (nthreads > units) nthreads = (int)units;
  if (nthreads <= 1) { fn(args, 0, n); return; }
#ifdef _OPENMP
  /* Built with -fopenmp, this library shares torch's OpenMP runtime (the loader resolves libgomp.so.1 to the copy
   * torch already loaded): its worker threads, which spin between torch's ops, do these chunks too. */
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
  for (int t = 0; t < nthreads; t++) {
    int64_t b = units * t / nthreads * grain, e = units * (t + 1) / nthreads * grain;
    fn(args, b, e < n ? e : n);
  }
#else
  chunk_t chunks[64];
  pthread_t threads[64];
  int started[64];
  for (int t = 0; t < nthreads; t++) {
    int64_t b = units * t / nthreads * grain, e = units * (t + 1) / nthreads * grain;
    chunks[t] = (chunk_t){fn, args, b, e < n ? e : n};
  }
  for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&threads[t], NULL, run_chunk, &chunks[t]) == 0;
  run_chunk(&chunks[0]);
  for (int t = 1; t < nthreads; t++) {
    if (started[t]) pthread_join(threads[t], NULL);
    else run_chunk(&chunks[t]); /* no thread available: do it here */
  }
#endif
}

/* ------------------------------------------------------------------------------------------------ scalar math */
static inline float bf16_to_f32(uint16_t b) { union { uint32_t u; float f; } v; v.u = (uint32_t)b << 16; return v.f; }
static inline uint16_t f32_to_bf16(float f) {
  union { uint32_t u; float f; } v; v.f = f;
  if (f != f) return 0x7fc0; /* NaN stays NaN */
  uint32_t u = v.u + 0x7fffu + ((v.u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float clamp64(float u) { return u < -64.f ? -64.f : (u > 64.f ? 64.f : u); }
/* exp(x) for x in [-87, 0]: Cody-Waite reduction, Cephes' degree-6 polynomial (~1 ulp). */
static inline float exp_nonpos(float x) {
  float n = (float)(int32_t)(x * 1.44269504088896341f - 0.5f); /* round half down; x <= 0 */
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f; p = p * r + 8.3334519073E-3f; p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f; p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  union { int32_t i; float f; } s; s.i = ((int32_t)n + 127) << 23;
  return p * s.f;
}
/* sigmoid(2z) and its pieces for the GELU of uc (u clamped to [-64, 64]: beyond, GELU is u or 0 in fp32). */
static inline void gelu_parts(float uc, float *s, float *e, float *r) {
  float z = GELU_C0 * (uc + GELU_C1 * uc * uc * uc);
  float az = z < 0.f ? -z : z;
  float ee = az > 43.f ? 0.f : exp_nonpos(-2.f * az); /* exp(-2|z|), 0 once it underflows */
  float rr = 1.f / (1.f + ee);
  *s = z < 0.f ? ee * rr : rr;
  *e = ee; *r = rr;
}
static inline float gelu_grad_scalar(float u) {
  float uc = clamp64(u), s, e, r;
  gelu_parts(uc, &s, &e, &r);
  /* d/du u sigmoid(2z) = s + u * 2 s (1 - s) dz/du, and s (1 - s) = e r^2 for either sign of z */
  return s + 2.f * uc * e * r * r * GELU_C0 * (1.f + 3.f * GELU_C1 * uc * uc);
}

/* ------------------------------------------------------------------------------------------------ AVX-512 math */
#ifdef DIT_AVX512
static inline __m512 ld16(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m256i to_bf16x16(__m512 f) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(f); /* round to nearest even, NaN kept (fp32 denormals become 0) */
#endif
  __m512i u = _mm512_castps_si512(f);
  __m512i rnd = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, rnd), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(u);
}
static inline void st16(uint16_t *p, __m512 f) { _mm256_storeu_si256((__m256i *)p, to_bf16x16(f)); }
static inline __m512 v1(float x) { return _mm512_set1_ps(x); }
static inline __m512 vexp_nonpos(__m512 x) {
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, v1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, v1(0.693359375f), x);
  r = _mm512_fmadd_ps(n, v1(2.12194440e-4f), r);
  __m512 p = v1(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, v1(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, v1(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, v1(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, v1(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, v1(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, v1(1.f)));
  return _mm512_scalef_ps(p, n);
}
static inline __m512 vclamp64(__m512 u) { return _mm512_min_ps(_mm512_max_ps(u, v1(-64.f)), v1(64.f)); }
static inline void vgelu_parts(__m512 uc, __m512 *s, __m512 *e, __m512 *r) {
  __m512 z = _mm512_mul_ps(v1(GELU_C0), _mm512_fmadd_ps(_mm512_mul_ps(v1(GELU_C1), _mm512_mul_ps(uc, uc)), uc, uc));
  __m512 az = _mm512_abs_ps(z);
  __m512 ee = vexp_nonpos(_mm512_mul_ps(az, v1(-2.f)));
  ee = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(az, v1(43.f), _CMP_LE_OQ), ee);
  __m512 d = _mm512_add_ps(ee, v1(1.f));
  __m512 rr = _mm512_rcp14_ps(d);
  rr = _mm512_mul_ps(rr, _mm512_fnmadd_ps(d, rr, v1(2.f))); /* one Newton step: ~2^-28 relative */
  *s = _mm512_mask_mul_ps(rr, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), ee, rr);
  *e = ee; *r = rr;
}
static inline __m512 vgelu_grad(__m512 u) {
  __m512 uc = vclamp64(u), s, e, r;
  vgelu_parts(uc, &s, &e, &r);
  __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(uc, e), _mm512_mul_ps(r, r)), v1(2.f * GELU_C0));
  __m512 q = _mm512_fmadd_ps(v1(3.f * GELU_C1), _mm512_mul_ps(uc, uc), v1(1.f));
  return _mm512_fmadd_ps(t, q, s);
}
#endif

/* ------------------------------------------------------------------------------------------------ loads/stores */
/* Each kernel exists for bf16 (uint16_t) and fp32 storage; the math is fp32 in both. */
static inline float ld1_bf16(const uint16_t *p) { return bf16_to_f32(*p); }
static inline void st1_bf16(uint16_t *p, float f) { *p = f32_to_bf16(f); }
static inline float ld1_f32(const float *p) { return *p; }
static inline void st1_f32(float *p, float f) { *p = f; }
#ifdef DIT_AVX512
static inline __m512 ld16_bf16(const uint16_t *p) { return ld16(p); }
static inline void st16_bf16(uint16_t *p, __m512 f) { st16(p, f); }
static inline __m512 ld16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void st16_f32(float *p, __m512 f) { _mm512_storeu_ps(p, f); }
#define VEC_LOOP(...) for (; i + 16 <= e; i += 16) { __VA_ARGS__; }
#else
#define VEC_LOOP(...)
#endif

#define DEFINE_KERNELS(SFX, T)                                                                                    \
typedef struct { const T *g, *u; T *out; } gelu_args_##SFX;                                                       \
static void gelu_fwd_range_##SFX(void *p, int64_t b, int64_t e) {                                                 \
  gelu_args_##SFX *a = (gelu_args_##SFX *)p;                                                                      \
  int64_t i = b;                                                                                                  \
  VEC_LOOP(__m512 u = ld16_##SFX(a->u + i); __m512 s, ee, r; vgelu_parts(vclamp64(u), &s, &ee, &r);               \
           st16_##SFX(a->out + i, _mm512_mul_ps(u, s)))                                                           \
  for (; i < e; i++) {                                                                                            \
    float u = ld1_##SFX(a->u + i), s, ee, r;                                                                      \
    gelu_parts(clamp64(u), &s, &ee, &r);                                                                          \
    st1_##SFX(a->out + i, u * s);                                                                                 \
  }                                                                                                               \
}                                                                                                                 \
static void gelu_bwd_range_##SFX(void *p, int64_t b, int64_t e) {                                                 \
  gelu_args_##SFX *a = (gelu_args_##SFX *)p;                                                                      \
  int64_t i = b;                                                                                                  \
  VEC_LOOP(st16_##SFX(a->out + i, _mm512_mul_ps(ld16_##SFX(a->g + i), vgelu_grad(ld16_##SFX(a->u + i)))))        \
  for (; i < e; i++) st1_##SFX(a->out + i, ld1_##SFX(a->g + i) * gelu_grad_scalar(ld1_##SFX(a->u + i)));         \
}                                                                                                                 \
/* out = gelu_tanh(u), n values. */                                                                               \
void dit_gelu_fwd_##SFX(const T *u, T *out, int64_t n, int nthreads) {                                            \
  gelu_args_##SFX a = {NULL, u, out};                                                                             \
  parallel_for(gelu_fwd_range_##SFX, &a, n, 4096, nthreads);                                                      \
}                                                                                                                 \
/* out = g * gelu_tanh'(u), n values. */                                                                          \
void dit_gelu_bwd_##SFX(const T *g, const T *u, T *out, int64_t n, int nthreads) {                                \
  gelu_args_##SFX a = {g, u, out};                                                                                \
  parallel_for(gelu_bwd_range_##SFX, &a, n, 4096, nthreads);                                                      \
}                                                                                                                 \
typedef struct {                                                                                                  \
  const T *g, *x; const float *m; float offset; T *gx; float *gm, *gsum; int64_t T_, D;                          \
} rowscale_args_##SFX;                                                                                            \
static void rowscale_bwd_range_##SFX(void *p, int64_t nb, int64_t ne) {                                           \
  rowscale_args_##SFX *a = (rowscale_args_##SFX *)p;                                                              \
  const int64_t TT = a->T_, D = a->D;                                                                             \
  for (int64_t n = nb; n < ne; n++) {                                                                             \
    const float *m = a->m + n * D;                                                                                \
    float *gm = a->gm + n * D, *gs = a->gsum ? a->gsum + n * D : NULL;                                            \
    memset(gm, 0, sizeof(float) * D);                                                                             \
    if (gs) memset(gs, 0, sizeof(float) * D);                                                                     \
    for (int64_t t = 0; t < TT; t++) {                                                                            \
      const T *g = a->g + (n * TT + t) * D, *x = a->x + (n * TT + t) * D;                                         \
      T *gx = a->gx + (n * TT + t) * D;                                                                           \
      int64_t i = 0, e = D;                                                                                       \
      VEC_LOOP(__m512 gv = ld16_##SFX(g + i);                                                                     \
               st16_##SFX(gx + i, _mm512_mul_ps(gv, _mm512_add_ps(_mm512_loadu_ps(m + i), v1(a->offset))));      \
               _mm512_storeu_ps(gm + i, _mm512_fmadd_ps(gv, ld16_##SFX(x + i), _mm512_loadu_ps(gm + i)));        \
               if (gs) _mm512_storeu_ps(gs + i, _mm512_add_ps(gv, _mm512_loadu_ps(gs + i))))                      \
      for (; i < e; i++) {                                                                                        \
        float gv = ld1_##SFX(g + i);                                                                              \
        st1_##SFX(gx + i, gv * (m[i] + a->offset));                                                               \
        gm[i] += gv * ld1_##SFX(x + i);                                                                           \
        if (gs) gs[i] += gv;                                                                                      \
      }                                                                                                           \
    }                                                                                                             \
  }                                                                                                               \
}                                                                                                                 \
void dit_rowscale_bwd_##SFX(const T *g, const T *x, const float *m, float offset, T *gx, float *gm, float *gsum,   \
                            int64_t N, int64_t TT, int64_t D, int nthreads) {                                     \
  rowscale_args_##SFX a = {g, x, m, offset, gx, gm, gsum, TT, D};                                                 \
  parallel_for(rowscale_bwd_range_##SFX, &a, N, 1, nthreads);                                                     \
}

/* Backward of out[n, t, :] = x[n, t, :] * m[n, :] (+ terms independent of x and m), over [N, T, D]
 * (dit_rowscale_bwd_*):
 *   gx[n, t, :] = g[n, t, :] * (m[n, :] + offset)
 *   gm[n, :]    = sum_t g[n, t, :] * x[n, t, :]                (fp32 accumulation)
 *   gsum[n, :]  = sum_t g[n, t, :]          (if gsum != NULL; the shift's gradient in modulate)
 * m is fp32 [N, D]. modulate: x = normalised input, m = scale, offset 1. Gated residual: x = branch output,
 * m = gate, offset 0, and gx is the branch's gradient.
 */
DEFINE_KERNELS(bf16, uint16_t)
DEFINE_KERNELS(f32, float)

/* ------------------------------------------------------------------------------------------------ softmax */
/* Row softmax of bf16 scores and its backward, for the explicit attention of CPU bf16 training (fp32 math, one
 * read and one write of the [rows, L] matrix each; ATen's bf16 softmax and its backward make several passes). */
typedef struct { const uint16_t *x, *g; uint16_t *out; int64_t L; } softmax_args;

static void softmax_fwd_range(void *p, int64_t rb, int64_t re) {
  softmax_args *a = (softmax_args *)p;
  const int64_t L = a->L;
  float buf[L];
  for (int64_t r = rb; r < re; r++) {
    const uint16_t *x = a->x + r * L;
    uint16_t *out = a->out + r * L;
    float mx = -__builtin_inff(), sum = 0.f;
    int64_t j = 0;
#ifdef DIT_AVX512
    __m512 vm = v1(-__builtin_inff());
    for (; j + 16 <= L; j += 16) vm = _mm512_max_ps(vm, ld16(x + j));
    mx = _mm512_reduce_max_ps(vm);
#endif
    for (; j < L; j++) { float v = bf16_to_f32(x[j]); mx = v > mx ? v : mx; }
    if (mx == -__builtin_inff()) mx = 0.f; /* a row of -inf: 0/0 = NaN below, like ATen */
    j = 0;
#ifdef DIT_AVX512
    __m512 vs = _mm512_setzero_ps();
    for (; j + 16 <= L; j += 16) {
      __m512 d = _mm512_sub_ps(ld16(x + j), v1(mx)); /* <= 0; below -87 exp is 0 in fp32 anyway */
      __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, v1(-87.f), _CMP_GE_OQ), vexp_nonpos(_mm512_max_ps(d, v1(-87.f))));
      _mm512_storeu_ps(buf + j, e);
      vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#endif
    for (; j < L; j++) {
      float d = bf16_to_f32(x[j]) - mx;
      buf[j] = d < -87.f ? 0.f : exp_nonpos(d);
      sum += buf[j];
    }
    float inv = 1.f / sum;
    j = 0;
#ifdef DIT_AVX512
    for (; j + 16 <= L; j += 16) st16(out + j, _mm512_mul_ps(_mm512_loadu_ps(buf + j), v1(inv)));
#endif
    for (; j < L; j++) out[j] = f32_to_bf16(buf[j] * inv);
  }
}

static void softmax_bwd_range(void *p, int64_t rb, int64_t re) {
  softmax_args *a = (softmax_args *)p;
  const int64_t L = a->L;
  for (int64_t r = rb; r < re; r++) {
    const uint16_t *y = a->x + r * L, *g = a->g + r * L;
    uint16_t *out = a->out + r * L;
    float dot = 0.f;
    int64_t j = 0;
#ifdef DIT_AVX512
    __m512 vd = _mm512_setzero_ps();
    for (; j + 16 <= L; j += 16) vd = _mm512_fmadd_ps(ld16(g + j), ld16(y + j), vd);
    dot = _mm512_reduce_add_ps(vd);
#endif
    for (; j < L; j++) dot += bf16_to_f32(g[j]) * bf16_to_f32(y[j]);
    j = 0;
#ifdef DIT_AVX512
    for (; j + 16 <= L; j += 16) st16(out + j, _mm512_mul_ps(ld16(y + j), _mm512_sub_ps(ld16(g + j), v1(dot))));
#endif
    for (; j < L; j++) out[j] = f32_to_bf16(bf16_to_f32(y[j]) * (bf16_to_f32(g[j]) - dot));
  }
}

/* out[r, :] = softmax(x[r, :]) over rows x L. */
void dit_softmax_fwd_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t L, int nthreads) {
  softmax_args a = {x, NULL, out, L};
  parallel_for(softmax_fwd_range, &a, rows, 16, nthreads);
}

/* out = y * (g - sum(g * y)) per row: the gradient of softmax at output y for output gradient g. */
void dit_softmax_bwd_bf16(const uint16_t *y, const uint16_t *g, uint16_t *out, int64_t rows, int64_t L,
                          int nthreads) {
  softmax_args a = {y, g, out, L};
  parallel_for(softmax_bwd_range, &a, rows, 16, nthreads);
}

/* ------------------------------------------------------------------------------------------------ qkv layout */
/* The fused QKV projection yields [N, T, 3, H, d]; attention wants [3, N, H, T, d]. Both directions as copies of
 * d-element rows (ATen's general strided copy of these permutations runs at a fraction of memory speed). */
typedef struct { const uint16_t *src; uint16_t *dst; int64_t N, T, H, d; int to_heads; } qkv_args;

static void qkv_range(void *p, int64_t nb, int64_t ne) {
  qkv_args *a = (qkv_args *)p;
  const int64_t N = a->N, T = a->T, H = a->H, d = a->d;
  for (int64_t n = nb; n < ne; n++)
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < 3; j++)
        for (int64_t h = 0; h < H; h++) {
          int64_t tok = (((n * T + t) * 3 + j) * H + h) * d, head = (((j * N + n) * H + h) * T + t) * d;
          if (a->to_heads) memcpy(a->dst + head, a->src + tok, sizeof(uint16_t) * d);
          else memcpy(a->dst + tok, a->src + head, sizeof(uint16_t) * d);
        }
}

/* dst [3, N, H, T, d] from src [N, T, 3, H, d] (to_heads = 1), or back (to_heads = 0); 16-bit values. */
void dit_qkv_permute_u16(const uint16_t *src, uint16_t *dst, int64_t N, int64_t T, int64_t H, int64_t d,
                         int to_heads, int nthreads) {
  qkv_args a = {src, dst, N, T, H, d, to_heads};
  parallel_for(qkv_range, &a, N, 1, nthreads);
}

/* ------------------------------------------------------------------------------------------------ fp32 block */
/* fp32 CPU training of the adaLN-Zero block (dit/fused_block.py). A Linear layer's bias is not added by the matmul
 * (ATen's addmm first writes the broadcast bias into its output, an extra pass) but by the kernel that consumes
 * the matmul's output, and its gradient (a column sum) is accumulated by the kernel that produces the output's
 * gradient. Sums over tokens are per sample, each sample on one thread in a fixed order: results do not depend on
 * the thread count. Layouts: tokens [N, T, D] row-major, per-sample vectors [N, D], per-channel vectors [D]. */
typedef struct {
  const float *x, *g, *a, *b, *c; float eps; float *out, *s1, *s2, *s3; int64_t T, D;
} block_args;

/* LayerNorm without affine of each row, then the adaLN modulation:
 *   out[n, t, :] = (x - mean) * rstd * (1 + scale[n, :]) + shift[n, :],  rstd = 1 / sqrt(var + eps)
 * (a = shift, b = scale; per-row mean and rstd are written to s1, s2 for the backward). */
static void norm_modulate_fwd_range(void *p, int64_t rb, int64_t re) {
  block_args *A = (block_args *)p;
  const int64_t T = A->T, D = A->D;
  for (int64_t r = rb; r < re; r++) {
    const float *x = A->x + r * D, *shift = A->a + (r / T) * D, *scale = A->b + (r / T) * D;
    float *out = A->out + r * D;
    float sum = 0.f, sq = 0.f;
    int64_t i = 0;
#ifdef DIT_AVX512
    __m512 vs = _mm512_setzero_ps();
    for (; i + 16 <= D; i += 16) vs = _mm512_add_ps(vs, _mm512_loadu_ps(x + i));
    sum = _mm512_reduce_add_ps(vs);
#endif
    for (; i < D; i++) sum += x[i];
    const float mean = sum / (float)D;
    i = 0; /* two passes (the row is in L1): no cancellation in the variance */
#ifdef DIT_AVX512
    __m512 vq = _mm512_setzero_ps();
    for (; i + 16 <= D; i += 16) {
      __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), v1(mean));
      vq = _mm512_fmadd_ps(d, d, vq);
    }
    sq = _mm512_reduce_add_ps(vq);
#endif
    for (; i < D; i++) sq += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / __builtin_sqrtf(sq / (float)D + A->eps);
    A->s1[r] = mean; A->s2[r] = rstd;
    i = 0;
#ifdef DIT_AVX512
    for (; i + 16 <= D; i += 16) {
      __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), v1(mean)), v1(rstd));
      __m512 m = _mm512_add_ps(_mm512_loadu_ps(scale + i), v1(1.f));
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(xh, m, _mm512_loadu_ps(shift + i)));
    }
#endif
    for (; i < D; i++) out[i] = (x[i] - mean) * rstd * (1.f + scale[i]) + shift[i];
  }
}

/* Backward of norm_modulate for the output gradient g (b = scale, s1/s2 = mean/rstd from the forward):
 *   xhat = (x - mean) rstd,  gh = g (1 + scale[n]),  out = rstd (gh - mean_D(gh) - xhat mean_D(gh xhat))
 *   s3 = gscale[n, :] = sum_t g xhat,  c = gshift[n, :] = sum_t g   (fp32 accumulation). */
static void norm_modulate_bwd_range(void *p, int64_t nb, int64_t ne) {
  block_args *A = (block_args *)p;
  const int64_t T = A->T, D = A->D;
  for (int64_t n = nb; n < ne; n++) {
    const float *scale = A->b + n * D;
    float *gsc = A->s3 + n * D, *gsh = (float *)A->c + n * D;
    memset(gsc, 0, sizeof(float) * D);
    memset(gsh, 0, sizeof(float) * D);
    for (int64_t t = 0; t < T; t++) {
      const int64_t r = n * T + t;
      const float *x = A->x + r * D, *g = A->g + r * D;
      float *out = A->out + r * D;
      const float mean = A->s1[r], rstd = A->s2[r];
      float sg = 0.f, sgx = 0.f;
      int64_t i = 0;
#ifdef DIT_AVX512
      __m512 vg = _mm512_setzero_ps(), vgx = _mm512_setzero_ps();
      for (; i + 16 <= D; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), v1(mean)), v1(rstd));
        __m512 gh = _mm512_mul_ps(gv, _mm512_add_ps(_mm512_loadu_ps(scale + i), v1(1.f)));
        vg = _mm512_add_ps(vg, gh);
        vgx = _mm512_fmadd_ps(gh, xh, vgx);
        _mm512_storeu_ps(gsc + i, _mm512_fmadd_ps(gv, xh, _mm512_loadu_ps(gsc + i)));
        _mm512_storeu_ps(gsh + i, _mm512_add_ps(gv, _mm512_loadu_ps(gsh + i)));
      }
      sg = _mm512_reduce_add_ps(vg); sgx = _mm512_reduce_add_ps(vgx);
#endif
      for (; i < D; i++) {
        const float xh = (x[i] - mean) * rstd, gh = g[i] * (1.f + scale[i]);
        sg += gh; sgx += gh * xh;
        gsc[i] += g[i] * xh; gsh[i] += g[i];
      }
      const float mg = sg / (float)D, mgx = sgx / (float)D;
      i = 0;
#ifdef DIT_AVX512
      for (; i + 16 <= D; i += 16) {
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), v1(mean)), v1(rstd));
        __m512 gh = _mm512_mul_ps(_mm512_loadu_ps(g + i), _mm512_add_ps(_mm512_loadu_ps(scale + i), v1(1.f)));
        __m512 d = _mm512_sub_ps(_mm512_sub_ps(gh, v1(mg)), _mm512_mul_ps(xh, v1(mgx)));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(d, v1(rstd)));
      }
#endif
      for (; i < D; i++) {
        const float xh = (x[i] - mean) * rstd, gh = g[i] * (1.f + scale[i]);
        out[i] = (gh - mg - xh * mgx) * rstd;
      }
    }
  }
}

/* out = gelu_tanh(x + bias) over rows of D (a = bias). */
static void gelu_bias_fwd_range(void *p, int64_t rb, int64_t re) {
  block_args *A = (block_args *)p;
  const int64_t D = A->D;
  const float *bias = A->a;
  for (int64_t r = rb; r < re; r++) {
    const float *x = A->x + r * D;
    float *out = A->out + r * D;
    int64_t i = 0, e = D;
    VEC_LOOP(__m512 u = _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(bias + i)); __m512 s, ee, rr;
             vgelu_parts(vclamp64(u), &s, &ee, &rr); _mm512_storeu_ps(out + i, _mm512_mul_ps(u, s)))
    for (; i < e; i++) {
      float u = x[i] + bias[i], s, ee, rr;
      gelu_parts(clamp64(u), &s, &ee, &rr);
      out[i] = u * s;
    }
  }
}

/* out = g * gelu_tanh'(x + bias) (a = bias) and s3[n, :] = sum_t out[n, t, :] (the bias gradient of sample n). */
static void gelu_bias_bwd_range(void *p, int64_t nb, int64_t ne) {
  block_args *A = (block_args *)p;
  const int64_t T = A->T, D = A->D;
  const float *bias = A->a;
  for (int64_t n = nb; n < ne; n++) {
    float *gb = A->s3 + n * D;
    memset(gb, 0, sizeof(float) * D);
    for (int64_t t = 0; t < T; t++) {
      const float *x = A->x + (n * T + t) * D, *g = A->g + (n * T + t) * D;
      float *out = A->out + (n * T + t) * D;
      int64_t i = 0, e = D;
      VEC_LOOP(__m512 gu = _mm512_mul_ps(_mm512_loadu_ps(g + i),
                                         vgelu_grad(_mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(bias + i))));
               _mm512_storeu_ps(out + i, gu); _mm512_storeu_ps(gb + i, _mm512_add_ps(gu, _mm512_loadu_ps(gb + i))))
      for (; i < e; i++) {
        const float gu = g[i] * gelu_grad_scalar(x[i] + bias[i]);
        out[i] = gu;
        gb[i] += gu;
      }
    }
  }
}

/* out[n, t, :] = x[n, t, :] + gate[n, :] * (y[n, t, :] + bias)   (g = y, a = gate, b = bias). */
static void gated_bias_fwd_range(void *p, int64_t rb, int64_t re) {
  block_args *A = (block_args *)p;
  const int64_t T = A->T, D = A->D;
  const float *bias = A->b;
  for (int64_t r = rb; r < re; r++) {
    const float *x = A->x + r * D, *y = A->g + r * D, *gate = A->a + (r / T) * D;
    float *out = A->out + r * D;
    int64_t i = 0, e = D;
    VEC_LOOP(__m512 yb = _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(bias + i));
             _mm512_storeu_ps(out + i, _mm512_fmadd_ps(_mm512_loadu_ps(gate + i), yb, _mm512_loadu_ps(x + i))))
    for (; i < e; i++) out[i] = x[i] + gate[i] * (y[i] + bias[i]);
  }
}

/* out[n, t, j*D:(j+1)*D] = G_j[n, t, :] for j = 0, 1, 2 (the gradients of q, k, v; strides in dit_qkv_grad_f32)
 * and gb[n, :] = sum_t out[n, t, :] (the per-sample QKV bias gradient). */
typedef struct { const float *G[3]; int64_t sn[3], st[3]; float *out, *gb; int64_t T, D; } qkv_grad_args;
static void qkv_grad_range(void *p, int64_t nb, int64_t ne) {
  qkv_grad_args *A = (qkv_grad_args *)p;
  const int64_t T = A->T, D = A->D;
  for (int64_t n = nb; n < ne; n++) {
    float *gb = A->gb + n * 3 * D;
    memset(gb, 0, sizeof(float) * 3 * D);
    for (int64_t t = 0; t < T; t++)
      for (int j = 0; j < 3; j++) {
        const float *src = A->G[j] + n * A->sn[j] + t * A->st[j];
        float *dst = A->out + (n * T + t) * 3 * D + j * D, *acc = gb + j * D;
        int64_t i = 0, e = D;
        VEC_LOOP(__m512 v = _mm512_loadu_ps(src + i); _mm512_storeu_ps(dst + i, v);
                 _mm512_storeu_ps(acc + i, _mm512_add_ps(v, _mm512_loadu_ps(acc + i))))
        for (; i < e; i++) { dst[i] = src[i]; acc[i] += src[i]; }
      }
  }
}

/* out = norm_modulate(x; shift, scale), mean/rstd [N*T] saved; x, out [N, T, D], shift/scale [N, D]. */
void dit_norm_modulate_fwd_f32(const float *x, const float *shift, const float *scale, float eps, float *out,
                               float *mean, float *rstd, int64_t N, int64_t T, int64_t D, int nthreads) {
  block_args a = {x, NULL, shift, scale, NULL, eps, out, mean, rstd, NULL, T, D};
  parallel_for(norm_modulate_fwd_range, &a, N * T, 16, nthreads);
}
/* gx, gscale [N, D], gshift [N, D] from the output gradient g (see norm_modulate_bwd_range). */
void dit_norm_modulate_bwd_f32(const float *g, const float *x, const float *mean, const float *rstd,
                               const float *scale, float *gx, float *gscale, float *gshift, int64_t N, int64_t T,
                               int64_t D, int nthreads) {
  block_args a = {x, g, NULL, scale, gshift, 0.f, gx, (float *)mean, (float *)rstd, gscale, T, D};
  parallel_for(norm_modulate_bwd_range, &a, N, 1, nthreads);
}
/* out = gelu_tanh(x + bias), x [rows, D]. */
void dit_gelu_bias_fwd_f32(const float *x, const float *bias, float *out, int64_t rows, int64_t D, int nthreads) {
  block_args a = {x, NULL, bias, NULL, NULL, 0.f, out, NULL, NULL, NULL, 1, D};
  parallel_for(gelu_bias_fwd_range, &a, rows, 16, nthreads);
}
/* gx = g * gelu_tanh'(x + bias) over [N, T, D]; gbias [N, D] = per-sample sums over t of gx. */
void dit_gelu_bias_bwd_f32(const float *g, const float *x, const float *bias, float *gx, float *gbias, int64_t N,
                           int64_t T, int64_t D, int nthreads) {
  block_args a = {x, g, bias, NULL, NULL, 0.f, gx, NULL, NULL, gbias, T, D};
  parallel_for(gelu_bias_bwd_range, &a, N, 1, nthreads);
}
/* out = x + gate[n] * (y + bias) over [N, T, D]. */
void dit_gated_bias_fwd_f32(const float *x, const float *gate, const float *y, const float *bias, float *out,
                            int64_t N, int64_t T, int64_t D, int nthreads) {
  block_args a = {x, y, gate, bias, NULL, 0.f, out, NULL, NULL, NULL, T, D};
  parallel_for(gated_bias_fwd_range, &a, N * T, 16, nthreads);
}
/* out [N, T, 3, D] from the gradients of q, k, v: G_j[n, t, :] at G_j + n * sn_j + t * st_j (element strides,
 * D contiguous values, e.g. [N, H, T, d] gradients laid out as [N, T, H, d]); gbias [N, 3, D] = per-sample sums. */
void dit_qkv_grad_f32(const float *gq, const float *gk, const float *gv, const int64_t *sn, const int64_t *st,
                      float *out, float *gbias, int64_t N, int64_t T, int64_t D, int nthreads) {
  qkv_grad_args a = {{gq, gk, gv}, {sn[0], sn[1], sn[2]}, {st[0], st[1], st[2]}, out, gbias, T, D};
  parallel_for(qkv_grad_range, &a, N, 1, nthreads);
}

/* Which code path this build took (for logs and tests). */
int dit_native_simd(void) {
#ifdef DIT_AVX512
  return 512;
#else
  return 0;
#endif
}
