// A 4-bit weight matrix product for decoding on x86 CPUs with AVX512-VNNI (llm/infer/int4_kernel.py).
//
// Decoding reads every weight once per token, so a product should stream its weights at the
// memory's read bandwidth. With 4-bit weights the arithmetic is the limit instead: converting each
// weight to float and multiplying it costs more vector instructions than the memory leaves time for
// (PyTorch's int4 kernel, which does that, reaches about half the bandwidth). VNNI's vpdpbusd
// multiplies 64 pairs of bytes and adds them in fours into 16 int32 lanes in one instruction, so
// the activations are quantized too, per group of 32 inputs, as llama.cpp's q8_0 activations are
// (d = max|x| / 127, xq = round(x / d)): each chunk of 64 weights then costs one load, three
// instructions to unpack the nibbles, one vpdpbusd, one conversion and one multiply-add per row.
//
// y[m, n] = sum over groups g of  scale[n, g] * d[m, g] * sum_{i in g} q[n, i] * xq[m, i]
//                                + low[n, g] * sum_{i in g} x[m, i]          (exact sums of x)
// for w[n, i] = q[n, i] * scale[n, g] + low[n, g], q in 0..15, scale and low fp16 (N, K/32).
//
// Weight layout (uint8, N/4 tiles of 4 outputs, one stream per tile): tile t, chunk c of 64 inputs,
// output 4t + r holds 32 bytes at ((t * K/64 + c) * 4 + r) * 32; byte j is input c*64 + j in its
// low nibble and input c*64 + 32 + j in its high one. So vpdpbusd's lanes 0-7 add group 2c and
// lanes 8-15 group 2c + 1, and the four outputs of a tile are read as one sequential stream.
// x (M, K) fp32, K a multiple of 64, N a multiple of 4; y (M, N) fp32. Rows of x are taken up to 4
// at a time, each tile's unpacked nibbles used for all of them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int GROUP = 32;
constexpr int TILE = 4;      // outputs read as one stream
constexpr int MAX_ROWS = 4;  // rows of x per pass over a tile
constexpr int PREFETCH = 2048;  // bytes ahead of the weights being read

// The activations, quantized: per row, the int8 values; per chunk of 64 inputs, x's scale d for
// each of vpdpbusd's 16 lanes (lanes 0-7: group 2c, 8-15: group 2c + 1); per group, the sum of x.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> lanes, sums;
};

void quantize_rows(const float* x, int64_t m, int64_t k, QuantizedRows& r) {
  const int64_t groups = k / GROUP;
  r.q.resize(m * k);
  r.lanes.resize(m * groups * 8);
  r.sums.resize(m * groups);
  for (int64_t i = 0; i < m * groups; ++i) {
    const float* xg = x + i * GROUP;
    const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // round half to even (the default rounding mode), saturated to int8
    _mm_storeu_si128(reinterpret_cast<__m128i*>(&r.q[i * GROUP]), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inverse))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(&r.q[i * GROUP + 16]), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inverse))));
    std::fill_n(&r.lanes[i * 8], 8, amax / 127.f);  // group i's 8 lanes of its chunk
    r.sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
}

// Lane l of pair(c) is c * 2 + l / 8: spreads groups 2c and 2c + 1 of 16 loaded scales over the lanes.
inline __m512i pair(int c) {
  return _mm512_add_epi32(_mm512_set1_epi32(2 * c), _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
}

// y[row, n0 + r] for the tile's 4 outputs r and ROWS rows of x.
template <int ROWS>
void tile_product(const uint8_t* w, const uint16_t* scale, const uint16_t* low, int64_t k, const QuantizedRows& x,
                  int64_t row0, float* y, int64_t n, int64_t n0) {
  const int64_t groups = k / GROUP, chunks = k / 64;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS][TILE];
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < TILE; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += 8) {  // 8 chunks = 16 groups: one load of each output's scales
    const int64_t count = std::min<int64_t>(8, chunks - c0);
    const __mmask16 valid = static_cast<__mmask16>((1u << (2 * count)) - 1);
    __m512 scales[TILE];
    for (int r = 0; r < TILE; ++r) scales[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, scale + r * groups + 2 * c0));
    for (int64_t ci = 0; ci < count; ++ci) {
      const int64_t c = c0 + ci;
      const uint8_t* chunk = w + c * TILE * 32;
      _mm_prefetch(reinterpret_cast<const char*>(chunk + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(chunk + PREFETCH + 64), _MM_HINT_T0);
      __m512i q[TILE];
      __m512 wscale[TILE];
      for (int r = 0; r < TILE; ++r) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + r * 32));
        q[r] = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1), nibble);
        wscale[r] = _mm512_permutexvar_ps(pair(static_cast<int>(ci)), scales[r]);
      }
      for (int i = 0; i < ROWS; ++i) {
        const int64_t row = row0 + i;
        const __m512i xq = _mm512_loadu_si512(&x.q[row * k + c * 64]);
        const __m512 d = _mm512_loadu_ps(&x.lanes[(row * chunks + c) * 16]);
        for (int r = 0; r < TILE; ++r) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[r], xq));
          acc[i][r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, wscale[r]), acc[i][r]);
        }
      }
    }
  }
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {  // the low term: low[g] times the sum of x over g
    const __mmask16 valid = groups - g0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g0)) - 1);
    __m512 lows[TILE];
    for (int r = 0; r < TILE; ++r) lows[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, low + r * groups + g0));
    for (int i = 0; i < ROWS; ++i) {
      const __m512 sums = _mm512_maskz_loadu_ps(valid, &x.sums[(row0 + i) * groups + g0]);
      for (int r = 0; r < TILE; ++r) acc[i][r] = _mm512_fmadd_ps(lows[r], sums, acc[i][r]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < TILE; ++r) y[(row0 + i) * n + n0 + r] = _mm512_reduce_add_ps(acc[i][r]);
}

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor low) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: (M, K) contiguous fp32");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), groups = k / GROUP;
  TORCH_CHECK(k % 64 == 0 && n % TILE == 0, "K must be a multiple of 64 and N of 4");
  TORCH_CHECK(weight.scalar_type() == torch::kByte && weight.is_contiguous() && weight.size(1) * 2 == k,
              "weight: contiguous uint8 (N, K/2)");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && low.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              low.is_contiguous() && scale.numel() == n * groups && low.numel() == n * groups,
              "scale and low: contiguous fp16 (N, K/32)");
  thread_local QuantizedRows rows;  // reused: no allocation per call
  quantize_rows(x.data_ptr<float>(), m, k, rows);
  auto y = torch::empty({m, n});
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* l = reinterpret_cast<const uint16_t*>(low.data_ptr<at::Half>());
  float* out = y.data_ptr<float>();
  const QuantizedRows& xr = rows;
  at::parallel_for(0, n / TILE, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tw = w + t * TILE * (k / 2);
      const uint16_t *ts = s + t * TILE * groups, *tl = l + t * TILE * groups;
      int64_t row = 0;
      for (; row + MAX_ROWS <= m; row += MAX_ROWS) tile_product<MAX_ROWS>(tw, ts, tl, k, xr, row, out, n, t * TILE);
      switch (m - row) {
        case 3: tile_product<3>(tw, ts, tl, k, xr, row, out, n, t * TILE); break;
        case 2: tile_product<2>(tw, ts, tl, k, xr, row, out, n, t * TILE); break;
        case 1: tile_product<1>(tw, ts, tl, k, xr, row, out, n, t * TILE); break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llm_int4, m) { m.def("int4_mm(Tensor x, Tensor weight, Tensor scale, Tensor low) -> Tensor"); }

TORCH_LIBRARY_IMPL(llm_int4, CPU, m) { m.impl("int4_mm", &int4_mm); }
