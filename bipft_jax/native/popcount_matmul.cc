// Register-blocked popcount matmuls for the packed encoder's Linears: an XLA FFI custom call for CPUs.
//
// Built on first use by bipft_jax/native/__init__.py with the host's C++ compiler (-O3
// -march=native) and cached per machine. The counts are bipft_jax/packed.py's signed_matmul,
// exactly (integers); only the loop structure differs: XLA emits one output element at a time and
// reloads the weight's words for every row, while here an R x (C * 16) block of outputs stays in
// registers over the whole contracted axis: each weight word is loaded once per block as a vector
// of 16 columns, each activation word broadcast to it.
//
// A call takes the Linear's input signs as float32 [M, K] and packs them itself, in packed.py's bit
// order and with its predicates (in XLA the packing took about as long as the products), and the
// weight's planes as pack_params stores them: [W, N], W = ceil(K / 32) words along K. Per word
// (xs/xn: x's sign and nonzero planes, ws/wn: w's):
//   kSigned        diff += popcount((xs ^ ws) & xn)               out = popcount(xn) - 2 diff
//   kSignedMasked  both = xn & wn; total += popcount(both); diff += popcount((xs ^ ws) & both)
//                                                                  out = total - 2 diff
// (kSignedMasked when the weight has exact zeros: then it carries a nonzero plane.)
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && !defined(BIPFT_PORTABLE)
#include <immintrin.h>
#define BIPFT_AVX512 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // 32-bit words per vector: 512 bits

#ifdef BIPFT_AVX512
using Vec = __m512i;
inline __mmask16 lane_mask(int valid) { return valid >= kLanes ? 0xFFFF : (__mmask16)((1u << valid) - 1); }
inline Vec load(const uint32_t* p, int valid) { return _mm512_maskz_loadu_epi32(lane_mask(valid), p); }
inline Vec broadcast(uint32_t v) { return _mm512_set1_epi32((int)v); }
inline Vec zero() { return _mm512_setzero_si512(); }
inline Vec xor_and(Vec a, Vec b, Vec c) { return _mm512_ternarylogic_epi32(a, b, c, 0x28); }  // (a ^ b) & c
inline Vec and_(Vec a, Vec b) { return _mm512_and_si512(a, b); }
inline Vec add_popcount(Vec acc, Vec v) { return _mm512_add_epi32(acc, _mm512_popcnt_epi32(v)); }
inline Vec sub_twice(Vec total, Vec diff) { return _mm512_sub_epi32(total, _mm512_slli_epi32(diff, 1)); }
inline void store(int32_t* p, Vec v, int valid) { _mm512_mask_storeu_epi32(p, lane_mask(valid), v); }
#else
// Any other host: the same blocks as plain arrays, left to the compiler's vectorizer.
struct Vec { uint32_t v[kLanes]; };
inline Vec load(const uint32_t* p, int valid) {
  Vec r;
  for (int l = 0; l < kLanes; ++l) r.v[l] = l < valid ? p[l] : 0;
  return r;
}
inline Vec broadcast(uint32_t x) { Vec r; for (int l = 0; l < kLanes; ++l) r.v[l] = x; return r; }
inline Vec zero() { return broadcast(0); }
inline Vec xor_and(Vec a, Vec b, Vec c) { for (int l = 0; l < kLanes; ++l) a.v[l] = (a.v[l] ^ b.v[l]) & c.v[l]; return a; }
inline Vec and_(Vec a, Vec b) { for (int l = 0; l < kLanes; ++l) a.v[l] &= b.v[l]; return a; }
inline Vec add_popcount(Vec acc, Vec v) {
  for (int l = 0; l < kLanes; ++l) acc.v[l] += __builtin_popcount(v.v[l]);
  return acc;
}
inline Vec sub_twice(Vec total, Vec diff) { for (int l = 0; l < kLanes; ++l) total.v[l] -= 2 * diff.v[l]; return total; }
inline void store(int32_t* p, Vec v, int valid) {
  for (int l = 0; l < kLanes && l < valid; ++l) p[l] = (int32_t)v.v[l];
}
#endif

enum Mode { kSigned, kSignedMasked };

// x planes [M, W] against w planes [W, N] -> out [M, N].
struct Problem {
  const uint32_t* xs;
  const uint32_t* xn;
  const uint32_t* ws;
  const uint32_t* wn;  // unused by kSigned
  int64_t m, w, n;
  int32_t* out;
};

// Outputs rows [row, row + R) x columns [col, col + C * 16) (valid_cols of them real).
template <Mode mode, int R, int C>
void block(const Problem& pr, int64_t row, int64_t col, int64_t valid_cols) {
  const int64_t words = pr.w, n = pr.n;  // locals: the compiler cannot know stores leave `pr` alone
  const uint32_t* xs = pr.xs + row * words;
  const uint32_t* xn = pr.xn + row * words;
  const uint32_t* ws = pr.ws + col;
  const uint32_t* wn = pr.wn ? pr.wn + col : nullptr;
  int valid[C];
  for (int c = 0; c < C; ++c) valid[c] = (int)std::clamp<int64_t>(valid_cols - c * kLanes, 0, kLanes);

  // Fully unrolled so that the accumulators live in registers (R * C of them, twice for
  // kSignedMasked's per-output totals).
  constexpr int kTotals = mode == kSigned ? 1 : R * C;
  Vec diff[R * C], total[kTotals];
  uint32_t row_total[R] = {};
#pragma GCC unroll 16
  for (int i = 0; i < R * C; ++i) diff[i] = zero();
#pragma GCC unroll 16
  for (int i = 0; i < kTotals; ++i) total[i] = zero();
  for (int64_t k = 0; k < words; ++k) {
    Vec w_sign[C], w_nonzero[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      w_sign[c] = load(ws + k * n + c * kLanes, valid[c]);
      if constexpr (mode == kSignedMasked) w_nonzero[c] = load(wn + k * n + c * kLanes, valid[c]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec x_sign = broadcast(xs[r * words + k]);
      if constexpr (mode == kSigned) {
        const uint32_t x_nonzero_word = xn[r * words + k];
        const Vec x_nonzero = broadcast(x_nonzero_word);
        row_total[r] += __builtin_popcount(x_nonzero_word);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) diff[r * C + c] = add_popcount(diff[r * C + c], xor_and(x_sign, w_sign[c], x_nonzero));
      } else {
        const Vec x_nonzero = broadcast(xn[r * words + k]);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const Vec both = and_(x_nonzero, w_nonzero[c]);
          total[r * C + c] = add_popcount(total[r * C + c], both);
          diff[r * C + c] = add_popcount(diff[r * C + c], xor_and(x_sign, w_sign[c], both));
        }
      }
    }
  }
  int32_t* out = pr.out + row * n + col;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      Vec t;
      if constexpr (mode == kSigned) t = broadcast(row_total[r]);
      else t = total[r * C + c];
      store(out + r * n + c * kLanes, sub_twice(t, diff[r * C + c]), valid[c]);
    }
}

// Rows per block: what the 32 vector registers of AVX-512 hold next to 4 column vectors (16
// accumulators, or 2 x 8 for kSignedMasked, plus the operands). Block shapes
// from 2 x 64 to 8 x 32 ran within 1.3x of each other on the AMD EPYC (Zen 4); 3 x 64 was fastest.
template <Mode mode> constexpr int kRows = mode == kSigned ? 3 : 2;
constexpr int kColumnVectors = 4;
constexpr int64_t kBlockColumns = kColumnVectors * kLanes;

template <Mode mode, int R>
void rows_tail(const Problem& pr, int64_t row, int64_t col, int64_t valid_cols, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return block<mode, R, kColumnVectors>(pr, row, col, valid_cols);
    rows_tail<mode, R - 1>(pr, row, col, valid_cols, rows);
  }
}

// One work item: every row against one block of kBlockColumns columns (the weight's block, W x 64
// words, stays in L1 while the rows stream past it).
template <Mode mode>
void column_block(const Problem& pr, int64_t item) {
  const int64_t col = item * kBlockColumns, valid_cols = std::min(kBlockColumns, pr.n - col);
  constexpr int R = kRows<mode>;
  int64_t row = 0;
  for (; row + R <= pr.m; row += R) block<mode, R, kColumnVectors>(pr, row, col, valid_cols);
  if (row < pr.m) rows_tail<mode, R - 1>(pr, row, col, valid_cols, pr.m - row);
}

// Runs items [0, n) on the calling thread and XLA's intra-op pool. Every thread claims items from a
// shared counter; the caller waits only for items other threads have claimed and are running, so
// a task the pool starts late finds nothing left and returns (it holds the state it reads).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State { std::atomic<int64_t> next{0}, done{0}; };
  auto state = std::make_shared<State>();
  auto work = [state, n, fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Packs one row of K values' signs into its sign and nonzero planes, `words` words each, in
// packed.py's bit order (element k -> word k % W, bit k / W) and with its predicates (x < 0,
// x != 0: -0 is zero, NaN nonzero and not negative). Bits past K stay 0.
void pack_row(const float* x, int64_t k_len, int64_t words, uint32_t* sign, uint32_t* nonzero) {
#ifdef BIPFT_AVX512
  const __m512 zero_ps = _mm512_setzero_ps();
  for (int64_t w0 = 0; w0 < words; w0 += kLanes) {
    const int valid_words = (int)std::min<int64_t>(kLanes, words - w0);
    Vec negative = zero(), nonzero_bits = zero();
    for (int j = 0; j < 32; ++j) {
      const int64_t start = j * words + w0;
      if (start >= k_len) break;  // so are the later bits' elements
      const __mmask16 valid = lane_mask((int)std::min<int64_t>(valid_words, k_len - start));
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + start);
      const Vec bit = broadcast(1u << j);
      negative = _mm512_mask_or_epi32(negative, _mm512_mask_cmp_ps_mask(valid, v, zero_ps, _CMP_LT_OQ), negative, bit);
      nonzero_bits = _mm512_mask_or_epi32(nonzero_bits, _mm512_mask_cmp_ps_mask(valid, v, zero_ps, _CMP_NEQ_UQ),
                                          nonzero_bits, bit);
    }
    store((int32_t*)sign + w0, negative, valid_words);
    store((int32_t*)nonzero + w0, nonzero_bits, valid_words);
  }
#else
  for (int64_t w = 0; w < words; ++w) {
    uint32_t negative = 0, nonzero_bits = 0;
    for (int j = 0; j < 32 && j * words + w < k_len; ++j) {
      const float v = x[j * words + w];
      negative |= (uint32_t)(v < 0) << j;
      nonzero_bits |= (uint32_t)(v != 0) << j;
    }
    sign[w] = negative;
    nonzero[w] = nonzero_bits;
  }
#endif
}

// A Linear: x's signs as float32 [M, K] (packed here, both threads), the weight's planes [W, N].
template <Mode mode>
ffi::Error linear_product(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> ws,
                          const uint32_t* wn, ffi::ResultBuffer<ffi::S32> out) {
  const auto x_dims = x.dimensions(), w_dims = ws.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || w_dims[0] != (x_dims[1] + 31) / 32)
    return ffi::Error::InvalidArgument("popcount_matmul: a Linear's operands must be [M, K] and [ceil(K / 32), N]");
  const int64_t m = x_dims[0], k_len = x_dims[1], words = w_dims[0];
  std::unique_ptr<uint32_t[]> planes(new uint32_t[2 * m * words]);
  uint32_t *sign = planes.get(), *nonzero = planes.get() + m * words;
  constexpr int64_t kPackRows = 64;
  parallel_for(pool, (m + kPackRows - 1) / kPackRows, [&](int64_t item) {
    for (int64_t row = item * kPackRows; row < std::min(m, (item + 1) * kPackRows); ++row)
      pack_row(x.typed_data() + row * k_len, k_len, words, sign + row * words, nonzero + row * words);
  });
  const Problem pr{sign, nonzero, ws.typed_data(), wn, m, words, w_dims[1], out->typed_data()};
  parallel_for(pool, (pr.n + kBlockColumns - 1) / kBlockColumns, [&pr](int64_t item) { column_block<mode>(pr, item); });
  return ffi::Error::Success();
}

ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> ws,
                  ffi::ResultBuffer<ffi::S32> out) {
  return linear_product<kSigned>(pool, x, ws, nullptr, out);
}

ffi::Error LinearMasked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> ws,
                        ffi::Buffer<ffi::U32> wn, ffi::ResultBuffer<ffi::S32> out) {
  return linear_product<kSignedMasked>(pool, x, ws, wn.typed_data(), out);
}

}  // namespace

extern "C" int bipft_vectorized() {
#ifdef BIPFT_AVX512
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BipftPopcountLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BipftPopcountLinearMasked, LinearMasked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
