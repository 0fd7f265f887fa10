// Fused integer linear layer for CPU: activation quantization + int8/int4 GEMM + zero-point/scale epilogue
// in one call, registered as the torch operator `harness_kernels::int_linear`.
//
// Why: at decode (one token per step) a 576x1536 layer's integer GEMM takes a few microseconds, while the
// dozen eager torch ops that quantize the input and apply the epilogue take tens. Doing all of it in one
// C++ call removes that overhead; small batches use an AVX512-VNNI dot-product kernel that reads the int4
// nibbles directly (no unpacked copy), larger ones quantize here and call at::_int_mm (oneDNN, AMX if present).
//
// Arithmetic contract (must stay bit-identical to harness/kernels/actquant.py and harness.quant):
//   scale = (max(hi,0) - min(lo,0)) / (2^b - 1)   (asymmetric)  |  max(|lo|,|hi|) / (2^(b-1)-1)  (symmetric)
//   scale = max(scale, 1e-8); zero = clamp(round(-min(lo,0)/scale), 0, 2^b-1)  (asymmetric; 0 if symmetric)
//   code  = clamp(round(x / scale) + zero, qmin, qmax), round = nearest-even, IEEE float32 division.
// Codes are held as unsigned bytes xu (asymmetric: the code; symmetric: code + 128) with zero zu (zero or 128),
// so x = scale * (xu - zu) and the VNNI instruction (u8 x s8) applies directly.
// Weights are centred signed codes wc (int8 rows, or nibbles wc + 8 in 64-value blocks of 32 bytes: byte b =
// value b | value b + 32 << 4) with centred zero zw: w = s_w * (wc - zw).
//   y[m,n] = s_x[m] * sum_g s_w[n,g] * (acc - zu*R[n,g] - zw[n,g]*X[m,g] + Kg*zu*zw[n,g]) + bias[n]
// with acc = sum_k xu*wc over the group, R = sum wc, X = sum xu (X only for asymmetric weights). The float
// operations run in the same order as the torch path's, so both backends give bit-identical outputs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HK_VNNI 1
#else
#define HK_VNNI 0
#endif

namespace {

constexpr float kMinScale = 1e-8f;
constexpr int64_t kBlock = 64;  // int4 block (values) and SIMD chunk (bytes)

struct RowQ {
  float scale;
  int32_t zu;  // zero point in xu space
};

RowQ qparams(float lo, float hi, int64_t bits, bool sym) {
  RowQ r;
  if (sym) {
    const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
    r.scale = std::max(std::fabs(lo), std::fabs(hi)) / qmax;
  } else {
    const float qmax = static_cast<float>((1 << bits) - 1);
    lo = std::min(lo, 0.0f);
    hi = std::max(hi, 0.0f);
    r.scale = (hi - lo) / qmax;
  }
  r.scale = std::isnan(r.scale) ? r.scale : std::max(r.scale, kMinScale);
  if (sym) {
    r.zu = 128;
  } else {
    const float qmax = static_cast<float>((1 << bits) - 1);
    float z = std::nearbyint(-(lo / r.scale));
    r.zu = static_cast<int32_t>(std::min(std::max(z, 0.0f), qmax));
  }
  return r;
}

// Range (min, max) of n floats; `nan` is set if any is NaN (torch.aminmax would return NaN).
void row_range(const float* x, int64_t n, float& lo, float& hi, bool& nan) {
#if HK_VNNI
  __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
    bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    vlo = _mm512_mask_min_ps(vlo, m, vlo, v);
    vhi = _mm512_mask_max_ps(vhi, m, vhi, v);
    bad |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
  }
  lo = _mm512_reduce_min_ps(vlo);
  hi = _mm512_reduce_max_ps(vhi);
  nan = bad != 0;
#else
  lo = INFINITY;
  hi = -INFINITY;
  nan = false;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    nan |= std::isnan(x[i]);
  }
#endif
}

// Quantize one row of K floats into xu (zero-padded to kp); returns true if the row held a NaN. Each byte is the
// code plus 128 (symmetric) or the code (asymmetric), plus `offset`: -128 writes the same codes centred as int8.
bool quantize_row(const float* x, int64_t k, int64_t kp, const RowQ& q, int64_t bits, bool sym, uint8_t* xu,
                  int32_t offset = 0) {
  float qmin, qmax, zero;
  int32_t shift;
  if (sym) {
    qmax = static_cast<float>((1 << (bits - 1)) - 1);
    qmin = -qmax;
    zero = 0.0f;
    shift = 128 + offset;
  } else {
    qmax = static_cast<float>((1 << bits) - 1);
    qmin = 0.0f;
    zero = static_cast<float>(q.zu);
    shift = offset;
  }
  const float s = q.scale;
  bool nan = false;
  int64_t i = 0;
#if HK_VNNI
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(zero), vmin = _mm512_set1_ps(qmin),
               vmax = _mm512_set1_ps(qmax);
  const __m512i vshift = _mm512_set1_epi32(shift);
  __mmask16 bad = 0;
  for (; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    bad |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), vmin), vmax);
    const __m512i qi = _mm512_add_epi32(_mm512_cvttps_epi32(r), vshift);
    _mm_mask_storeu_epi8(xu + i, m, _mm512_cvtepi32_epi8(qi));
  }
  nan = bad != 0;
  i = k;
#endif
  for (; i < k; ++i) {
    nan |= std::isnan(x[i]);
    float v = std::nearbyint(x[i] / s) + zero;
    v = std::min(std::max(v, qmin), qmax);
    xu[i] = static_cast<uint8_t>(static_cast<int32_t>(v) + shift);
  }
  for (int64_t j = k; j < kp; ++j) xu[j] = 0;
  return nan;
}

// Per-group sums of the codes of one row (only needed for asymmetric weights).
void row_group_sums(const uint8_t* xu, int64_t groups, int64_t group, int32_t* xsum) {
  for (int64_t g = 0; g < groups; ++g) {
    int32_t acc = 0;
    const uint8_t* p = xu + g * group;
    for (int64_t i = 0; i < group; ++i) acc += p[i];
    xsum[g] = acc;
  }
}

// Centred int8 weight [n, k] from the int4 block layout (for the oneDNN path).
void unpack_int4_rows(const uint8_t* w4, int64_t n, int64_t k, int64_t kp, int8_t* out) {
  const int64_t half = kBlock / 2;
#if HK_VNNI
  const __m256i nib_mask = _mm256_set1_epi8(15);
  const __m256i eight = _mm256_set1_epi8(8);
#endif
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    std::vector<int8_t> row(static_cast<size_t>(k == kp ? 0 : kp));
    for (int64_t r = b; r < e; ++r) {
      const uint8_t* src = w4 + r * (kp / 2);
      // a row whose width is whole blocks is written in place; otherwise through `row` (k < kp)
      int8_t* dst = k == kp ? out + r * k : row.data();
      for (int64_t blk = 0; blk < kp / kBlock; ++blk) {
        const uint8_t* p = src + blk * half;
        int8_t* d = dst + blk * kBlock;
#if HK_VNNI
        // 32 packed bytes -> 64 centred values in six instructions (the scalar loop below is the reference)
        const __m256i pk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(pk, nib_mask), eight);
        const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(pk, 4), nib_mask), eight);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + half), hi);
#else
        for (int64_t j = 0; j < half; ++j) {
          d[j] = static_cast<int8_t>((p[j] & 15) - 8);
          d[j + half] = static_cast<int8_t>((p[j] >> 4) - 8);
        }
#endif
      }
      if (k != kp) std::copy(row.begin(), row.begin() + k, out + r * k);
    }
  });
}

struct Epilogue {
  const float* w_scale;  // [N or 1, G]
  int64_t w_scale_rows;
  const int32_t* w_zero;  // [N or 1, G] or null
  int64_t w_zero_rows;
  const int32_t* rowsum;  // [N, G]
  const float* bias;      // [N] or null
  int64_t groups;
  int64_t group;

  // Exact sum over one group of (xu - zu)(wc - zw) from the raw sum of xu * wc.
  inline int64_t corrected(int64_t n, int64_t g, int64_t acc, int32_t zu, int32_t xsum) const {
    int64_t a = acc - static_cast<int64_t>(zu) * rowsum[n * groups + g];
    if (w_zero != nullptr) {
      const int64_t zw = w_zero[(w_zero_rows > 1 ? n : 0) * groups + g];
      a += -zw * xsum + group * static_cast<int64_t>(zu) * zw;
    }
    return a;
  }
  inline float wscale(int64_t n, int64_t g) const { return w_scale[(w_scale_rows > 1 ? n : 0) * groups + g]; }
};

// Float output from the corrected per-group sums, in the torch path's operation order (so both backends
// round identically): one group: a * (s_x * s_w); several: (sum_g a_g * s_w,g) * s_x; then + bias.
struct OutAcc {
  float v = 0.0f;
  inline void add(const Epilogue& ep, int64_t n, int64_t g, int64_t a, float sx) {
    if (ep.groups == 1) {
      v = static_cast<float>(a) * (sx * ep.wscale(n, 0));
    } else {
      v += static_cast<float>(a) * ep.wscale(n, g);
    }
  }
  inline float finish(const Epilogue& ep, int64_t n, float sx) const {
    float out = ep.groups == 1 ? v : v * sx;
    if (ep.bias != nullptr) out += ep.bias[n];
    return out;
  }
};

// Scalar reference kernel (any shapes, any group size): y[m, n] for rows [m0, m1) and all n in [n0, n1).
void gemm_scalar(const uint8_t* xu, int64_t kp, const int32_t* xsum, const RowQ* rq, int64_t m0, int64_t m1,
                 const int8_t* w8, const uint8_t* w4, int64_t k, int64_t n0, int64_t n1, const Epilogue& ep,
                 float* y, int64_t ldy) {
  const int64_t wstride4 = kp / 2;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint8_t* xr = xu + m * kp;
      OutAcc out;
      for (int64_t g = 0; g < ep.groups; ++g) {
        int32_t acc = 0;
        for (int64_t i = g * ep.group; i < (g + 1) * ep.group; ++i) {
          int32_t wv;
          if (w8 != nullptr) {
            wv = w8[n * k + i];
          } else {
            const int64_t blk = i / kBlock, off = i % kBlock;
            const uint8_t byte = w4[n * wstride4 + blk * (kBlock / 2) + (off % (kBlock / 2))];
            wv = static_cast<int32_t>(off < kBlock / 2 ? (byte & 15) : (byte >> 4)) - 8;
          }
          acc += static_cast<int32_t>(xr[i]) * wv;
        }
        out.add(ep, n, g, ep.corrected(n, g, acc, rq[m].zu, xsum ? xsum[m * ep.groups + g] : 0), rq[m].scale);
      }
      y[m * ldy + n] = out.finish(ep, n, rq[m].scale);
    }
  }
}

#if HK_VNNI
// VNNI kernel for exactly MR rows of x (m0 .. m0+MR-1) and output channels [n0, n1); groups must be whole
// 64-value chunks (or a single group). Each chunk of a weight row is loaded (and unpacked) once for all MR rows.
template <int MR>
void gemm_vnni(const uint8_t* xu, int64_t kp, const int32_t* xsum, const RowQ* rq, int64_t m0,
               const int8_t* w8, const uint8_t* w4, int64_t k, int64_t n0, int64_t n1, const Epilogue& ep,
               float* y, int64_t ldy) {
  const int64_t chunks = kp / kBlock;
  const int64_t chunks_per_group = ep.groups == 1 ? chunks : ep.group / kBlock;
  const int64_t tail = k % kBlock;  // int8 rows are not padded: mask the last chunk's load
  const __mmask64 tail_mask = tail ? ((~0ULL) >> (64 - tail)) : ~0ULL;
  const __m256i nib_mask = _mm256_set1_epi8(15);
  const __m512i eight = _mm512_set1_epi8(8);
  const int64_t wstride4 = kp / 2;
  const uint8_t* xrow[MR];
  for (int j = 0; j < MR; ++j) xrow[j] = xu + (m0 + j) * kp;
  for (int64_t n = n0; n < n1; ++n) {
    OutAcc out[MR];
    for (int64_t g = 0; g < ep.groups; ++g) {
      __m512i acc[MR];
      for (int j = 0; j < MR; ++j) acc[j] = _mm512_setzero_si512();
      const int64_t c0 = g * chunks_per_group, c1 = c0 + chunks_per_group;
      for (int64_t c = c0; c < c1; ++c) {
        __m512i wv;
        if (w8 != nullptr) {
          const int8_t* p = w8 + n * k + c * kBlock;
          wv = (c == chunks - 1 && tail) ? _mm512_maskz_loadu_epi8(tail_mask, p) : _mm512_loadu_si512(p);
        } else {
          const __m256i pk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w4 + n * wstride4 + c * 32));
          const __m256i lo = _mm256_and_si256(pk, nib_mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(pk, 4), nib_mask);
          wv = _mm512_sub_epi8(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), eight);
        }
        for (int j = 0; j < MR; ++j) {
          acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(xrow[j] + c * kBlock), wv);
        }
      }
      for (int j = 0; j < MR; ++j) {
        const int64_t m = m0 + j;
        const int64_t a = ep.corrected(n, g, _mm512_reduce_add_epi32(acc[j]), rq[m].zu,
                                       xsum ? xsum[m * ep.groups + g] : 0);
        out[j].add(ep, n, g, a, rq[m].scale);
      }
    }
    for (int j = 0; j < MR; ++j) y[(m0 + j) * ldy + n] = out[j].finish(ep, n, rq[m0 + j].scale);
  }
}

// Rows [0, m) in tiles of up to 8, for output channels [n0, n1) taken 16 at a time so that a block of weight rows
// stays in L1 while every tile of x passes over it (the weights stream from memory once).
void gemm_vnni_rows(const uint8_t* xu, int64_t kp, const int32_t* xsum, const RowQ* rq, int64_t m,
                    const int8_t* w8, const uint8_t* w4, int64_t k, int64_t n0, int64_t n1, const Epilogue& ep,
                    float* y, int64_t ldy) {
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t ne = std::min(n1, nb + 16);
    for (int64_t m0 = 0; m0 < m; m0 += 8) {
      switch (std::min<int64_t>(8, m - m0)) {
        case 1: gemm_vnni<1>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        case 2: gemm_vnni<2>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        case 3: gemm_vnni<3>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        case 4: gemm_vnni<4>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        case 5: gemm_vnni<5>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        case 6: gemm_vnni<6>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        case 7: gemm_vnni<7>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
        default: gemm_vnni<8>(xu, kp, xsum, rq, m0, w8, w4, k, nb, ne, ep, y, ldy); break;
      }
    }
  }
}
#endif

}  // namespace

bool has_vnni() { return HK_VNNI != 0; }

// x: float32 [M, K] contiguous. qweight: int8 [N, K] (fmt_bits 8) or uint8 [N, kp/2] (fmt_bits 4).
at::Tensor int_linear(const at::Tensor& x, const at::Tensor& qweight, int64_t fmt_bits, const at::Tensor& w_scale,
                      const c10::optional<at::Tensor>& w_zero, const at::Tensor& w_rowsum, int64_t group_size,
                      const c10::optional<at::Tensor>& bias, int64_t a_bits, bool a_symmetric, bool per_token,
                      double a_scale, int64_t a_zero, bool a_static, int64_t small_m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 2-D");
  TORCH_CHECK(fmt_bits == 8 || fmt_bits == 4, "fmt_bits must be 8 or 4");
  const int64_t m = x.size(0), k = x.size(1), n = w_rowsum.size(0), groups = w_rowsum.size(1);
  const int64_t group = groups == 1 ? k : group_size;
  TORCH_CHECK(group * groups == k, "groups do not tile K");
  const int64_t kp = (k + kBlock - 1) / kBlock * kBlock;
  if (fmt_bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(0) == n && qweight.size(1) == k,
                "int8 weight must be [N, K]");
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(0) == n && qweight.size(1) == kp / 2,
                "int4 weight must be uint8 [N, padded K / 2]");
  }
  TORCH_CHECK(qweight.is_contiguous() && w_scale.is_contiguous() && w_rowsum.is_contiguous(), "contiguous buffers");

  TORCH_CHECK(k <= 16384, "K above 16384 could overflow the int32 epilogue");
  // 1. quantize the activations: per-token ranges are found row by row inside the parallel loop that quantizes
  // the row (one pass over x in each thread's cache); with one weight group and M above small_m the codes go
  // straight into the centred int8 buffer the oneDNN GEMM reads (2a), otherwise into the padded unsigned rows the
  // dot-product loops read (2b)
  const bool onednn = m > small_m && groups == 1;
  std::vector<RowQ> rq(static_cast<size_t>(m));
  const float* xp = x.data_ptr<float>();
  bool nan = false;
  if (a_static) {
    RowQ r;
    r.scale = static_cast<float>(a_scale);
    r.zu = a_symmetric ? 128 : static_cast<int32_t>(a_zero);
    std::fill(rq.begin(), rq.end(), r);
  } else if (!per_token) {
    float lo, hi;
    row_range(xp, m * k, lo, hi, nan);
    std::fill(rq.begin(), rq.end(), qparams(lo, hi, a_bits, a_symmetric));
  }
  TORCH_CHECK(!nan, "harness_kernels: NaN or inf in the input activations");
  const int64_t width = onednn ? k : kp;
  at::Tensor xu_t = at::empty({m, width}, x.options().dtype(onednn ? at::kChar : at::kByte));
  uint8_t* xu = static_cast<uint8_t*>(xu_t.data_ptr());
  const bool need_xsum = w_zero.has_value();
  std::vector<int32_t> xsum(static_cast<size_t>(need_xsum ? m * groups : 0));
  std::vector<char> row_nan(static_cast<size_t>(m), 0);
  const bool dynamic_rows = !a_static && per_token;
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      bool bad = false;
      if (dynamic_rows) {
        float lo, hi;
        row_range(xp + i * k, k, lo, hi, bad);
        rq[i] = qparams(lo, hi, a_bits, a_symmetric);
      }
      bad |= !std::isfinite(rq[i].scale);
      bad |= quantize_row(xp + i * k, k, width, rq[i], a_bits, a_symmetric, xu + i * width, onednn ? -128 : 0);
      // the code sums of the unsigned codes (asymmetric weights): from the centred int8 codes, add 128 per element
      if (need_xsum && !onednn) row_group_sums(xu + i * width, groups, group, xsum.data() + i * groups);
      if (need_xsum && onednn) {
        const int8_t* c = reinterpret_cast<const int8_t*>(xu + i * width);
        int32_t acc = 0;
        for (int64_t j = 0; j < k; ++j) acc += c[j];
        xsum[i] = acc + 128 * static_cast<int32_t>(k);
      }
      row_nan[i] = bad;
    }
  });
  for (char c : row_nan) TORCH_CHECK(!c, "harness_kernels: NaN or inf in the input activations");

  Epilogue ep;
  ep.w_scale = w_scale.data_ptr<float>();
  ep.w_scale_rows = w_scale.size(0);
  ep.w_zero = need_xsum ? w_zero->data_ptr<int32_t>() : nullptr;
  ep.w_zero_rows = need_xsum ? w_zero->size(0) : 0;
  ep.rowsum = w_rowsum.data_ptr<int32_t>();
  ep.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  ep.groups = groups;
  ep.group = group;
  const int32_t* xs_ptr = need_xsum ? xsum.data() : nullptr;

  at::Tensor y = at::empty({m, n}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* w8 = fmt_bits == 8 ? qweight.data_ptr<int8_t>() : nullptr;
  const uint8_t* w4 = fmt_bits == 4 ? qweight.data_ptr<uint8_t>() : nullptr;

  // 2a. large M, one group: oneDNN int8 GEMM on (xu - 128) as int8, so acc(xu) = acc(xu - 128) + 128 * R
  if (onednn) {
    const at::Tensor& xs = xu_t;
    at::Tensor w = qweight;
    if (fmt_bits == 4) {
      w = at::empty({n, k}, x.options().dtype(at::kChar));
      unpack_int4_rows(w4, n, k, kp, w.data_ptr<int8_t>());
    }
    at::Tensor acc_t = at::_int_mm(xs, w.t());
    const int32_t* acc = acc_t.data_ptr<int32_t>();
    std::vector<float> sw(static_cast<size_t>(n));
    std::vector<int32_t> zw(static_cast<size_t>(n), 0);
    for (int64_t j = 0; j < n; ++j) {
      sw[j] = ep.w_scale[ep.w_scale_rows > 1 ? j : 0];
      if (need_xsum) zw[j] = ep.w_zero[ep.w_zero_rows > 1 ? j : 0];
    }
    const float* bp = ep.bias;
    const int32_t* rs = ep.rowsum;
    at::parallel_for(0, m, 4, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int32_t c = 128 - rq[i].zu;
        const float sx = rq[i].scale;
        const int32_t* a = acc + i * n;
        float* out = yp + i * n;
        if (need_xsum) {
          const int32_t xsi = xs_ptr[i], kz = static_cast<int32_t>(k) * rq[i].zu;
          for (int64_t j = 0; j < n; ++j) {
            out[j] = static_cast<float>(a[j] + c * rs[j] + (kz - xsi) * zw[j]) * (sx * sw[j]);
          }
        } else {
          for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(a[j] + c * rs[j]) * (sx * sw[j]);
        }
        if (bp != nullptr) {
          for (int64_t j = 0; j < n; ++j) out[j] += bp[j];
        }
      }
    });
    return y;
  }

  // 2b. small M (or grouped weights): dot products over the packed rows, parallel over output channels once
  // each thread gets enough work (~1M multiply-adds) to pay for waking it
  const bool simd = HK_VNNI && (groups == 1 || group % kBlock == 0);
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, kp * m));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
#if HK_VNNI
    if (simd) {
      gemm_vnni_rows(xu, kp, xs_ptr, rq.data(), m, w8, w4, k, n0, n1, ep, yp, n);
      return;
    }
#endif
    gemm_scalar(xu, kp, xs_ptr, rq.data(), 0, m, w8, w4, k, n0, n1, ep, yp, n);
  });
  return y;
}

TORCH_LIBRARY(harness_kernels, lib) {
  lib.def("int_linear(Tensor x, Tensor qweight, int fmt_bits, Tensor w_scale, Tensor? w_zero, Tensor w_rowsum, "
          "int group_size, Tensor? bias, int a_bits, bool a_symmetric, bool per_token, float a_scale, int a_zero, "
          "bool a_static, int small_m) -> Tensor");
  lib.def("has_vnni() -> bool", &has_vnni);
}

TORCH_LIBRARY_IMPL(harness_kernels, CPU, lib) { lib.impl("int_linear", &int_linear); }
