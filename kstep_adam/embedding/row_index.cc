// A batch's feature keys to table rows, and the rows deduplicated: the integer work the CTR
// trainer's reader thread does for every batch (TableTier.index), in two passes over the keys
// instead of NumPy's dozen temporaries. The results are the NumPy forms' exactly (integer
// arithmetic: _hashing.hash_keys_to_rows and _batch.RowDeduplicator, which tests compare).
// Built on first use by kstep_adam/_native.py and called through ctypes (the GIL released).

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Sorts values[0:n], all below 2^bits, with least-significant-digit radix passes of 11 bits
// (a batch's few thousand distinct rows: a comparison sort's unpredictable branches cost more).
void RadixSort(int64_t* values, int64_t n, int bits) {
  constexpr int kDigit = 11;
  std::vector<int64_t> buffer(n);
  int64_t* from = values;
  int64_t* to = buffer.data();
  for (int shift = 0; shift < bits; shift += kDigit) {
    int64_t offsets[(1 << kDigit) + 1] = {};
    for (int64_t i = 0; i < n; ++i) ++offsets[((from[i] >> shift) & ((1 << kDigit) - 1)) + 1];
    for (int d = 0; d < (1 << kDigit); ++d) offsets[d + 1] += offsets[d];
    for (int64_t i = 0; i < n; ++i) to[offsets[(from[i] >> shift) & ((1 << kDigit) - 1)]++] = from[i];
    std::swap(from, to);
  }
  if (from != values) std::copy(from, from + n, values);
}

}  // namespace

extern "C" {

// rows[i] = splitmix64(keys[i] ^ salt_mix) mod num_rows, for n int64 keys (their two's-
// complement bits); salt_mix is splitmix64(salt).
void KstepHashKeysToRows(const uint64_t* keys, int64_t n, uint64_t salt_mix, uint64_t num_rows,
                         int64_t* rows) {
  if ((num_rows & (num_rows - 1)) == 0) {  // a power of two: the remainder is the low bits
    const uint64_t mask = num_rows - 1;
    for (int64_t i = 0; i < n; ++i) rows[i] = static_cast<int64_t>(SplitMix64(keys[i] ^ salt_mix) & mask);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = static_cast<int64_t>(SplitMix64(keys[i] ^ salt_mix) % num_rows);
  }
}

// The sorted distinct values of rows[0:n] into unique (room for n), and each position's index
// among them into inverse; returns their number U. marks is the caller's scratch of num_rows
// int32 zeros, left all zero again. A row outside [0, num_rows) changes nothing: the result is
// then -1 - (its position).
int64_t KstepDeduplicateRows(const int64_t* rows, int64_t n, int64_t num_rows, int32_t* marks,
                             int64_t* unique, int32_t* inverse) {
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || rows[i] >= num_rows) return -1 - i;
  }
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t& mark = marks[rows[i]];
    if (mark == 0) {
      mark = 1;
      unique[count++] = rows[i];
    }
  }
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < num_rows) ++bits;
  RadixSort(unique, count, bits);
  for (int64_t u = 0; u < count; ++u) marks[unique[u]] = static_cast<int32_t>(u + 1);
  for (int64_t i = 0; i < n; ++i) inverse[i] = marks[rows[i]] - 1;
  for (int64_t u = 0; u < count; ++u) marks[unique[u]] = 0;
  return count;
}

}  // extern "C"
