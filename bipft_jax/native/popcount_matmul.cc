// Register-blocked popcount matmuls for the packed encoder's binarized products: XLA FFI custom calls
// for CPUs (the Linears, then attention's two products further down).
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
// (kSignedMasked when the weight has exact zeros: then it carries a nonzero plane.) The FFN's output
// Linear may instead take the input Linear's int32 counts and, per channel, a step function of the
// count giving the sign (LinearSteps: GELU and the binarizer tabulated by packed.prepare).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VPOPCNTDQ__) && !defined(BIPFT_PORTABLE)
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

// Packs one row of the previous Linear's K integer counts through per-channel step functions
// instead (see LinearSteps): the signs of input channel k are a step function of its count c with at
// most four steps, steps[0..2, k] the counts where a step starts (ascending; INT32_MAX: unused) and
// bits 2 i, 2 i + 1 of steps[3, k] step i's sign bit (s < 0) and nonzero bit (s != 0). Bit order and
// padding as pack_row's.
void pack_row_steps(const int32_t* counts, int64_t k_len, int64_t words, const int32_t* steps, uint32_t* sign,
                    uint32_t* nonzero) {
  const int32_t *first = steps, *second = steps + k_len, *third = steps + 2 * k_len;
  const uint32_t* codes = (const uint32_t*)(steps + 3 * k_len);
#ifdef BIPFT_AVX512
  const Vec one = broadcast(1), two = broadcast(2);
  for (int64_t w0 = 0; w0 < words; w0 += kLanes) {
    const int valid_words = (int)std::min<int64_t>(kLanes, words - w0);
    Vec negative = zero(), nonzero_bits = zero();
    for (int j = 0; j < 32; ++j) {
      const int64_t start = j * words + w0;
      if (start >= k_len) break;
      const __mmask16 valid = lane_mask((int)std::min<int64_t>(valid_words, k_len - start));
      const Vec c = _mm512_maskz_loadu_epi32(valid, counts + start);
      Vec shift = _mm512_maskz_mov_epi32(_mm512_cmpge_epi32_mask(c, load((const uint32_t*)first + start, valid)), two);
      shift = _mm512_mask_add_epi32(shift, _mm512_cmpge_epi32_mask(c, load((const uint32_t*)second + start, valid)),
                                    shift, two);
      shift = _mm512_mask_add_epi32(shift, _mm512_cmpge_epi32_mask(c, load((const uint32_t*)third + start, valid)),
                                    shift, two);
      const Vec code = _mm512_srlv_epi32(load(codes + start, valid), shift);
      const Vec bit = broadcast(1u << j);
      negative = _mm512_mask_or_epi32(negative, _mm512_mask_test_epi32_mask(valid, code, one), negative, bit);
      nonzero_bits = _mm512_mask_or_epi32(nonzero_bits, _mm512_mask_test_epi32_mask(valid, code, two),
                                          nonzero_bits, bit);
    }
    store((int32_t*)sign + w0, negative, valid_words);
    store((int32_t*)nonzero + w0, nonzero_bits, valid_words);
  }
#else
  for (int64_t w = 0; w < words; ++w) {
    uint32_t negative = 0, nonzero_bits = 0;
    for (int j = 0; j < 32 && j * words + w < k_len; ++j) {
      const int64_t k = j * words + w;
      const int32_t c = counts[k];
      const int step = (c >= first[k]) + (c >= second[k]) + (c >= third[k]);
      const uint32_t code = codes[k] >> (2 * step);
      negative |= (code & 1u) << j;
      nonzero_bits |= ((code >> 1) & 1u) << j;
    }
    sign[w] = negative;
    nonzero[w] = nonzero_bits;
  }
#endif
}

// The product of x's planes, packed row by row by pack(row, sign, nonzero) on both threads, with the
// weight's planes [W, N] into out [M, N].
template <Mode mode, typename Pack>
void packed_product(ffi::ThreadPool& pool, int64_t m, const uint32_t* ws, const uint32_t* wn, int64_t words, int64_t n,
                    int32_t* out, Pack pack) {
  std::unique_ptr<uint32_t[]> planes(new uint32_t[2 * m * words]);
  uint32_t *sign = planes.get(), *nonzero = planes.get() + m * words;
  constexpr int64_t kPackRows = 64;
  parallel_for(pool, (m + kPackRows - 1) / kPackRows, [&](int64_t item) {
    for (int64_t row = item * kPackRows; row < std::min(m, (item + 1) * kPackRows); ++row)
      pack(row, sign + row * words, nonzero + row * words);
  });
  const Problem pr{sign, nonzero, ws, wn, m, words, n, out};
  parallel_for(pool, (n + kBlockColumns - 1) / kBlockColumns, [&pr](int64_t item) { column_block<mode>(pr, item); });
}

// A Linear: x's signs as float32 [M, K] (packed here), the weight's planes [W, N].
template <Mode mode>
ffi::Error linear_product(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> ws,
                          const uint32_t* wn, ffi::ResultBuffer<ffi::S32> out) {
  const auto x_dims = x.dimensions(), w_dims = ws.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || w_dims[0] != (x_dims[1] + 31) / 32)
    return ffi::Error::InvalidArgument("popcount_matmul: a Linear's operands must be [M, K] and [ceil(K / 32), N]");
  const int64_t k_len = x_dims[1], words = w_dims[0];
  const float* data = x.typed_data();
  packed_product<mode>(pool, x_dims[0], ws.typed_data(), wn, words, w_dims[1], out->typed_data(),
                       [&](int64_t row, uint32_t* sign, uint32_t* nonzero) {
                         pack_row(data + row * k_len, k_len, words, sign, nonzero);
                       });
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

// A Linear whose input signs are step functions of the previous Linear's integer counts, channel by
// channel (the FFN's output Linear: GELU and its binarizer over the input Linear's counts, packed.py's
// ffn_steps): counts int32 [M, K], steps int32 [4, K] (pack_row_steps), the weight's planes [W, N].
template <Mode mode>
ffi::Error steps_product(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> steps,
                         ffi::Buffer<ffi::U32> ws, const uint32_t* wn, ffi::ResultBuffer<ffi::S32> out) {
  const auto c_dims = counts.dimensions(), s_dims = steps.dimensions(), w_dims = ws.dimensions();
  if (c_dims.size() != 2 || s_dims.size() != 2 || w_dims.size() != 2 || s_dims[0] != 4 || s_dims[1] != c_dims[1] ||
      w_dims[0] != (c_dims[1] + 31) / 32)
    return ffi::Error::InvalidArgument(
        "popcount_matmul: a Linear on step functions takes [M, K] counts, [4, K] steps and [ceil(K / 32), N] planes");
  const int64_t k_len = c_dims[1], words = w_dims[0];
  const int32_t* data = counts.typed_data();
  packed_product<mode>(pool, c_dims[0], ws.typed_data(), wn, words, w_dims[1], out->typed_data(),
                       [&](int64_t row, uint32_t* sign, uint32_t* nonzero) {
                         pack_row_steps(data + row * k_len, k_len, words, steps.typed_data(), sign, nonzero);
                       });
  return ffi::Error::Success();
}

ffi::Error LinearSteps(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> steps,
                       ffi::Buffer<ffi::U32> ws, ffi::ResultBuffer<ffi::S32> out) {
  return steps_product<kSigned>(pool, counts, steps, ws, nullptr, out);
}

ffi::Error LinearStepsMasked(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> steps,
                             ffi::Buffer<ffi::U32> ws, ffi::Buffer<ffi::U32> wn, ffi::ResultBuffer<ffi::S32> out) {
  return steps_product<kSignedMasked>(pool, counts, steps, ws, wn.typed_data(), out);
}

// --- attention's two products, per (batch, head) -----------------------------------------------
// Per head the products are small (K = 64, L = 128), so they get their own layout: 64-bit words in
// natural bit order (element t -> bit t % 64 of word t / 64), packed here from the float operands,
// and the counts written as float32 (exact integers) where the XLA graph continues. Both are one
// product of ternary rows against ternary columns,
//   count[i, j] = sum_w popcount(rn & cn) - 2 popcount((rs ^ cs) & rn & cn)
// (rs/rn: row i's sign and nonzero words, cs/cn: column j's): Q.K^T with q's rows and k's rows as
// columns; P.V with the kept probabilities as rows (sign 0, nonzero = kept) and v's columns packed
// along the positions.

// Bits of x < 0 and x != 0 (-0 is zero, NaN nonzero and not negative) of n <= 64 floats.
inline void pack_word(const float* x, int n, uint64_t* negative, uint64_t* nonzero) {
  uint64_t neg = 0, nz = 0;
#ifdef BIPFT_AVX512
  const __m512 zero_ps = _mm512_setzero_ps();
  for (int c = 0; c * kLanes < n; ++c) {
    const __mmask16 valid = lane_mask(n - c * kLanes);
    const __m512 v = _mm512_maskz_loadu_ps(valid, x + c * kLanes);
    neg |= (uint64_t)_mm512_mask_cmp_ps_mask(valid, v, zero_ps, _CMP_LT_OQ) << (c * kLanes);
    nz |= (uint64_t)_mm512_mask_cmp_ps_mask(valid, v, zero_ps, _CMP_NEQ_UQ) << (c * kLanes);
  }
#else
  for (int t = 0; t < n; ++t) {
    neg |= (uint64_t)(x[t] < 0) << t;
    nz |= (uint64_t)(x[t] != 0) << t;
  }
#endif
  *negative = neg, *nonzero = nz;
}

// Bits of n <= 64 booleans (one byte each, 0 or 1).
inline uint64_t pack_bools(const bool* b, int n) {
#ifdef BIPFT_AVX512
  const __m512i bytes = _mm512_maskz_loadu_epi8(n >= 64 ? ~0ULL : (1ULL << n) - 1, b);
  return _mm512_test_epi8_mask(bytes, bytes);
#else
  uint64_t bits = 0;
  for (int t = 0; t < n; ++t) bits |= (uint64_t)b[t] << t;
  return bits;
#endif
}

// In place: bit c of a[r] <-> bit r of a[c] (a 64 x 64 bit matrix transposed by 6 rounds of block swaps).
void transpose64(uint64_t a[64]) {
  uint64_t mask = 0x00000000FFFFFFFFULL;
  for (int width = 32; width != 0; width >>= 1, mask ^= mask << width)
    for (int r = 0; r < 64; r = (r + width + 1) & ~width) {
      const uint64_t swap = ((a[r] >> width) ^ a[r + width]) & mask;
      a[r] ^= swap << width;
      a[r + width] ^= swap;
    }
}

// Rows' planes [words, padded_rows] (padded to kRowBlock with zeros: they count 0), columns'
// [words, col_stride] (cols of them real).
constexpr int kRowBlock = 4;
struct Ternary {
  const uint64_t *row_sign, *row_nonzero, *col_sign, *col_nonzero;
  int64_t rows, padded_rows, cols, col_stride, words;
};

// out[i * stride + j] = count[i, j] as float32, for the rows i and columns j of `t`.
void ternary_counts(const Ternary& t, float* out, int64_t stride) {
  // Locals: the compiler cannot know that the stores to `out` leave `t` alone.
  const uint64_t *row_sign = t.row_sign, *row_nonzero = t.row_nonzero;
  const uint64_t *col_sign = t.col_sign, *col_nonzero = t.col_nonzero;
  const int64_t rows = t.rows, padded_rows = t.padded_rows, cols = t.cols, col_stride = t.col_stride;
  const int64_t words = t.words;
#ifdef BIPFT_AVX512
  constexpr int C = 2;  // column vectors of 8 per block: a 4 x 16 block of outputs in registers
  for (int64_t j = 0; j < cols; j += C * 8) {
    __mmask8 valid[C];
    for (int c = 0; c < C; ++c) {
      const int64_t left = std::clamp<int64_t>(cols - j - c * 8, 0, 8);
      valid[c] = (__mmask8)((1u << left) - 1);
    }
    for (int64_t i = 0; i < rows; i += kRowBlock) {
      __m512i total[kRowBlock * C], differ[kRowBlock * C];
#pragma GCC unroll 8
      for (int r = 0; r < kRowBlock * C; ++r) total[r] = differ[r] = _mm512_setzero_si512();
      for (int64_t w = 0; w < words; ++w) {
        __m512i cs[C], cn[C];
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) {
          cs[c] = _mm512_maskz_loadu_epi64(valid[c], col_sign + w * col_stride + j + c * 8);
          cn[c] = _mm512_maskz_loadu_epi64(valid[c], col_nonzero + w * col_stride + j + c * 8);
        }
#pragma GCC unroll 4
        for (int r = 0; r < kRowBlock; ++r) {
          const __m512i rs = _mm512_set1_epi64((int64_t)row_sign[w * padded_rows + i + r]);
          const __m512i rn = _mm512_set1_epi64((int64_t)row_nonzero[w * padded_rows + i + r]);
#pragma GCC unroll 2
          for (int c = 0; c < C; ++c) {
            const __m512i both = _mm512_and_si512(rn, cn[c]);
            total[r * C + c] = _mm512_add_epi64(total[r * C + c], _mm512_popcnt_epi64(both));
            differ[r * C + c] = _mm512_add_epi64(differ[r * C + c],
                                                 _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(rs, cs[c], both, 0x28)));
          }
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kRowBlock; ++r)
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) {
          if (i + r >= rows) break;
          const __m512i count = _mm512_sub_epi64(total[r * C + c], _mm512_slli_epi64(differ[r * C + c], 1));
          _mm256_mask_storeu_ps(out + (i + r) * stride + j + c * 8, valid[c], _mm512_cvtepi64_ps(count));
        }
    }
  }
#else
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      int64_t count = 0;
      for (int64_t w = 0; w < words; ++w) {
        const uint64_t both = row_nonzero[w * padded_rows + i] & col_nonzero[w * col_stride + j];
        count += __builtin_popcountll(both) -
                 2 * __builtin_popcountll((row_sign[w * padded_rows + i] ^ col_sign[w * col_stride + j]) & both);
      }
      out[i * stride + j] = (float)count;
    }
#endif
}

inline int64_t padded(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock * kRowBlock; }

// A [B, T, H, K] float32 operand packed along K: sign and nonzero planes [B, H, words, stride]
// (positions past T stay zero). Read row by row, every head at once: head by head, the strided
// reads missed the caches (the first compare after each load took half the packing's time).
struct HeadPlanes {
  int64_t batch, t, heads, k, words, stride;
  std::unique_ptr<uint64_t[]> planes;
  uint64_t* sign(int64_t b, int64_t head) const { return planes.get() + ((b * heads + head) * words) * stride; }
  uint64_t* nonzero(int64_t b, int64_t head) const { return sign(b, head) + batch * heads * words * stride; }

  HeadPlanes(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, int64_t stride)
      : batch(x.dimensions()[0]), t(x.dimensions()[1]), heads(x.dimensions()[2]), k(x.dimensions()[3]),
        words((k + 63) / 64), stride(stride), planes(new uint64_t[2 * batch * heads * words * stride]()) {
    constexpr int64_t kRowsPerItem = 16;
    const float* data = x.typed_data();
    parallel_for(pool, (batch * t + kRowsPerItem - 1) / kRowsPerItem, [&](int64_t item) {
      for (int64_t row = item * kRowsPerItem; row < std::min(batch * t, (item + 1) * kRowsPerItem); ++row) {
        const int64_t b = row / t, pos = row % t;
        for (int64_t head = 0; head < heads; ++head)
          for (int64_t w = 0; w < words; ++w)
            pack_word(data + (row * heads + head) * k + w * 64, (int)std::min<int64_t>(64, k - w * 64),
                      sign(b, head) + w * stride + pos, nonzero(b, head) + w * stride + pos);
      }
    });
  }
};

// counts[b, h, i, j] = sum_k sign(q)[b, i, h, k] sign(k)[b, j, h, k], one (b, h) per work item.
ffi::Error QueryKeyCounts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3])
    return ffi::Error::InvalidArgument("popcount_matmul: query and key must be [B, L, H, K] and [B, S, H, K]");
  const HeadPlanes qp(pool, q, padded(qd[1])), kp(pool, k, kd[1]);
  parallel_for(pool, qp.batch * qp.heads, [&](int64_t item) {
    const int64_t b = item / qp.heads, head = item % qp.heads;
    const Ternary t{qp.sign(b, head), qp.nonzero(b, head), kp.sign(b, head), kp.nonzero(b, head),
                    qp.t, qp.stride, kp.t, kp.stride, qp.words};
    ternary_counts(t, out->typed_data() + item * qp.t * kp.t, kp.t);
  });
  return ffi::Error::Success();
}

// counts[b, i, h, k] = sum_j keep[b, h, i, j] sign(v)[b, j, h, k], one (b, h) per work item.
ffi::Error ProbsValueCounts(ffi::ThreadPool pool, ffi::Buffer<ffi::PRED> keep, ffi::Buffer<ffi::F32> v,
                            ffi::ResultBuffer<ffi::F32> out) {
  const auto pd = keep.dimensions(), vd = v.dimensions();
  if (pd.size() != 4 || vd.size() != 4 || pd[0] != vd[0] || pd[1] != vd[2] || pd[3] != vd[1])
    return ffi::Error::InvalidArgument(
        "popcount_matmul: kept probabilities and value must be [B, H, L, S] and [B, S, H, K]");
  const int64_t heads = pd[1], lq = pd[2], ls = pd[3], dk = vd[3];
  const int64_t words = (ls + 63) / 64, rows = padded(lq), columns = (dk + 63) / 64 * 64;
  const HeadPlanes vp(pool, v, words * 64);  // packed along K, positions padded to whole words
  parallel_for(pool, pd[0] * heads, [&](int64_t item) {
    const int64_t b = item / heads, head = item % heads;
    std::unique_ptr<uint64_t[]> planes(new uint64_t[2 * words * (rows + columns)]());
    uint64_t *keep_zeros = planes.get(), *keep_bits = keep_zeros + words * rows;  // kept positions: rows with no sign
    uint64_t *v_sign = keep_bits + words * rows, *v_nonzero = v_sign + words * columns;
    const bool* keep_rows = keep.typed_data() + item * lq * ls;
    for (int64_t i = 0; i < lq; ++i)
      for (int64_t w = 0; w < words; ++w)
        keep_bits[w * rows + i] = pack_bools(keep_rows + i * ls + w * 64, (int)std::min<int64_t>(64, ls - w * 64));
    // v's signs along the positions: each block of 64 positions x 64 columns of vp transposed.
    for (int64_t w = 0; w < words; ++w)
      for (int64_t c = 0; c < vp.words; ++c) {
        uint64_t* sign_block = v_sign + w * columns + c * 64;
        uint64_t* nonzero_block = v_nonzero + w * columns + c * 64;
        std::copy_n(vp.sign(b, head) + c * vp.stride + w * 64, 64, sign_block);
        std::copy_n(vp.nonzero(b, head) + c * vp.stride + w * 64, 64, nonzero_block);
        transpose64(sign_block);
        transpose64(nonzero_block);
      }
    ternary_counts(Ternary{keep_zeros, keep_bits, v_sign, v_nonzero, lq, rows, dk, columns, words},
                   out->typed_data() + (b * lq * heads + head) * dk, heads * dk);
  });
  return ffi::Error::Success();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(BipftPopcountLinearSteps, LinearSteps,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BipftPopcountLinearStepsMasked, LinearStepsMasked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BipftPopcountQueryKey, QueryKeyCounts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BipftPopcountProbsValue, ProbsValueCounts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
