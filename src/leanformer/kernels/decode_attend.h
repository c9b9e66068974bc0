// The fused decode step's attention (decode.cpp includes this once): which rows read the same keys
// (KeyGroups), and one layer's RoPE + KV-cache write + softmax(q k^T / sqrt(D)) v over each row's keys
// (attend), the queries of each group of rows and KV head going through the keys together.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "decode_attn_avx512.h"  // avx512::scores / weighted_sum (AVX-512 CPUs)
#include "decode_kv.h"  // rope, KeyRows, scores, weighted_sum, KV-cache entry reads / writes
#include "vec8.h"  // exp8, exp1

namespace leanformer {
namespace {

// The rows of one step: row m's token sits at positions[m] and attends to keys 0..positions[m].
// Slot-major caches [slots, KV, max_seq, D]: row m writes position positions[m] of slot slots[m].
// Paged pools [blocks, KV, block_size, D] (models/paged_cache.py) seen as [rows, D]: `write` [M, KV] names
// the pool row of each new K/V, `read` [M, KV, S] the rows of keys 0..S-1 (S > every position), so the
// step reads each sequence's blocks where they lie (no gathered copy) and chained rows of one sequence
// (speculative verification) see each other's K/V, all rows writing before any attends.
struct StepRows {
  const int64_t* slots;
  const int64_t* pos;
  const int64_t* read = nullptr;  // null: slot-major
  const int64_t* write = nullptr;
  int64_t S = 0;
};

// Runs of consecutive rows that read the same keys: a sequence's chained rows [next token, drafts...]
// (speculative verification) at positions p, p + 1, ... Group g is rows start[g]..start[g + 1] - 1;
// lead[g], its row with the most keys, lists them for all (every other row's keys are a prefix of its).
// Found once per step: slot-major rows by slot; paged rows by comparing their key rows (a prefix cache
// shares blocks between sequences, so equal first keys do not make one sequence).
struct KeyGroups {
  std::vector<int64_t> start, lead;

  KeyGroups(const StepRows& rows, int64_t M, int64_t KV) {
    for (int64_t m = 0; m < M; ++m) {
      if (m > 0 && same_keys(rows, KV, lead.back(), m)) {
        if (rows.pos[m] > rows.pos[lead.back()]) lead.back() = m;
        continue;
      }
      start.push_back(m), lead.push_back(m);
    }
    start.push_back(M);
  }
  int64_t size() const { return static_cast<int64_t>(lead.size()); }

 private:
  static bool same_keys(const StepRows& rows, int64_t KV, int64_t a, int64_t b) {
    if (!rows.read) return rows.slots[a] == rows.slots[b];
    const int64_t n = std::min(rows.pos[a], rows.pos[b]) + 1;  // the shorter row's keys
    for (int64_t j = 0; j < KV; ++j)
      if (std::memcmp(rows.read + (a * KV + j) * rows.S, rows.read + (b * KV + j) * rows.S, n * sizeof(int64_t)))
        return false;
    return true;
  }
};

// p[0..S) <- softmax weights before normalisation (e^(p - max)); returns their sum, *max_out the max
inline float softmax_unnormalised(float* p, int64_t S, float* max_out) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p + s));
  float mx = hmax8(vmax);  // a max is exact in any order
  for (; s < S; ++s) mx = std::max(mx, p[s]);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (s = 0; s + 8 <= S; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), vmx));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum(acc);
  for (; s < S; ++s) total += (p[s] = exp1(p[s] - mx));
  *max_out = mx;
  return total;
}

// Keys go through attention in chunks of kKeyChunk (as flash-decoding does): a context's keys spread
// over the threads, each chunk read once by all the query heads of its KV head, and each chunk's
// softmax partials (max, sum, weighted sum) are merged in chunk order. A query's chunks follow from its
// key count alone, so its result does not depend on the step's rows or threads; with one chunk (up to
// kKeyChunk keys) nothing is merged. 128, not 512: one SmolLM2 row at 200 keys then makes 6 tasks (3
// KV heads x 2 chunks, 3 per thread) instead of 9 single-head tasks split 5 / 4 in which the threads
// read the middle KV head's keys twice and each query head streamed its keys alone; the whole step + head
// took 0.977 / 0.923 / 0.896x the time at 200 / 600 / 1,000 keys, 4 chained rows 0.98-1.02x (Zen 5, 2
// threads, scripts/i8_rows_ab.py).
constexpr int64_t kKeyChunk = 128;

inline int64_t key_chunks(int64_t S) { return (S + kKeyChunk - 1) / kKeyChunk; }

// out[D] = the softmax-weighted sum over n chunk partials part[c] = [max, sum, o[D]] (unnormalised)
inline void merge_chunks(const float* part, int64_t n, int64_t D, float* out) {
  float mx = -INFINITY;
  for (int64_t c = 0; c < n; ++c) mx = std::max(mx, part[c * (D + 2)]);
  float total = 0.f;
  std::fill(out, out + D, 0.f);
  for (int64_t c = 0; c < n; ++c) {
    const float* pc = part + c * (D + 2);
    const float w = exp1(pc[0] - mx);
    total += w * pc[1];
    for (int64_t i = 0; i < D; ++i) out[i] += w * pc[2 + i];
  }
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < D; ++i) out[i] *= inv;
}

// Rows of one key group a task takes together once the group has this many (a chained prefill): the
// task reads each key chunk once for all their queries and merges their chunks itself, where one task
// per (KV head, key chunk) over all the group's rows held a scores buffer of rows x 128 floats (1.5 MB
// at 1,000 rows, past L2) and left rows x heads x chunks partials to a merge on one thread.
constexpr int64_t kRowBlock = 16;

// One attention task: rows [r0, r1) of key group g (all in the group's order), query heads h0..h0 +
// heads - 1 (of KV head j), key chunks [c0, c1). Chunk tasks (c1 = c0 + 1) leave a query with several
// chunks its partial in the shared buffer, merged after all tasks; row-block tasks run every chunk of
// their rows and merge them themselves. Either way a query's result is what it gets alone, bit for bit.
struct AttnTask {
  int64_t g, j, h0, heads, r0, r1, c0, c1;
  bool own_merge;
};

// One attention task's buffers: scores [Q, keys], query / output / (max, sum) pointers, key counts,
// and a row-block task's partials [its queries, chunks, D + 2]
struct TaskScratch {
  std::vector<float> p;
  std::vector<const float*> q;
  std::vector<float*> o, sums;  // sums: where each query's (max, sum) go (multi-chunk queries)
  std::vector<int64_t> S;
  std::vector<float> total, mx, part;
};

// One layer's attention for all rows: rotate q/k, write k/v into the cache, then softmax(q k^T /
// sqrt(D)) v -> out [M, H*D]. qkv_out [M, (H + 2 KV) * D]; T: float, uint16_t (fp16 bits), int8_t (with
// per-row scales ks / vs). A task's queries read each key and value once, together (avx512::scores /
// weighted_sum), and each query's result is what it gets alone, bit for bit, so a verification row
// equals the plain step's row.
template <class T>
void attend(const at::Tensor& qkv_out, const float* cos, const float* sin, const at::Tensor& kc, const at::Tensor& vc,
            const at::Tensor& ks, const at::Tensor& vs, const StepRows& rows, const KeyGroups& groups, int64_t H,
            int64_t KV, int64_t D, at::Tensor& out) {
  const int64_t* pos = rows.pos;
  const int64_t M = qkv_out.size(0), max_seq = kc.size(2), row_len = (H + 2 * KV) * D;
  const float* src = qkv_out.data_ptr<float>();
  T* kp = static_cast<T*>(kc.data_ptr());
  T* vp = static_cast<T*>(vc.data_ptr());
  constexpr bool q8 = std::is_same_v<T, int8_t>;
  float* ksp = q8 ? ks.data_ptr<float>() : nullptr;
  float* vsp = q8 ? vs.data_ptr<float>() : nullptr;
  thread_local std::vector<float> qr;  // rotated queries [M, H * D], kept by the calling thread
  if (static_cast<int64_t>(qr.size()) < M * H * D) qr.resize(M * H * D);
  float* qrp = qr.data();
  int64_t work = 0;
  for (int64_t m = 0; m < M; ++m) work += H * (pos[m] + 1) * D;
  // RoPE and the cache writes, row by row (rows write distinct cache rows: a long chain's spread over
  // the threads)
  parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    std::vector<float> krot(D);
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = src + m * row_len;
      for (int64_t h = 0; h < H; ++h) rope(r + h * D, cos + m * D, sin + m * D, qrp + (m * H + h) * D, D);
      for (int64_t j = 0; j < KV; ++j) {
        // row index into the cache seen as [rows, D]
        const int64_t at_ = rows.write ? rows.write[m * KV + j] : (rows.slots[m] * KV + j) * max_seq + pos[m];
        rope(r + (H + j) * D, cos + m * D, sin + m * D, krot.data(), D);
        const float* v = r + (H + KV + j) * D;
        if constexpr (q8) {
          quantize_row(krot.data(), D, kp + at_ * D, ksp + at_);
          quantize_row(v, D, vp + at_ * D, vsp + at_);
        } else if constexpr (std::is_same_v<T, uint16_t>) {
          store_half(krot.data(), kp + at_ * D, D);
          store_half(v, vp + at_ * D, D);
        } else {
          std::copy(krot.begin(), krot.end(), kp + at_ * D);
          std::copy(v, v + D, vp + at_ * D);
        }
      }
    }
  });
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float* op = out.data_ptr<float>();
  const int64_t group = H / KV, G = groups.size();
  int64_t chunks = 1;  // key chunks of the longest row
  for (int64_t m = 0; m < M; ++m) chunks = std::max(chunks, key_chunks(pos[m] + 1));
  // A KV head's query heads in one task once there are tasks enough for the threads (their keys read
  // once): 4 per thread, or a multiple of the thread count; else one task per query head (one row of 100
  // keys on 2 threads: 9 tasks split 5 / 4, where 3 would split 2 / 1). Threads pay off from short
  // contexts on (SmolLM2 at 100 keys: 0.28 vs 0.42 ms per token on 2 threads); only tiny steps stay on
  // this thread.
  const int64_t threads = num_threads();
  auto heads_per_task = [&](int64_t kv_tasks) {
    return kv_tasks >= 4 * threads || (kv_tasks >= threads && kv_tasks % threads == 0) ? group : 1;
  };
  const int64_t heads = heads_per_task(G * KV * chunks);  // chunk tasks
  std::vector<AttnTask> tasks;
  bool shared_merge = false;  // some chunk task leaves partials in `part`
  for (int64_t g = 0; g < G; ++g) {
    const int64_t b = groups.start[g], e = groups.start[g + 1], n = key_chunks(pos[groups.lead[g]] + 1);
    if (e - b >= kRowBlock) {  // row blocks
      const int64_t rh = heads_per_task((e - b + kRowBlock - 1) / kRowBlock * KV), per = group / rh;
      for (int64_t r0 = b; r0 < e; r0 += kRowBlock)
        for (int64_t sub = 0; sub < KV * per; ++sub) {
          const int64_t r1 = std::min(e, r0 + kRowBlock);
          int64_t c1 = 0;
          for (int64_t m = r0; m < r1; ++m) c1 = std::max(c1, key_chunks(pos[m] + 1));
          tasks.push_back({g, sub / per, (sub / per) * group + (sub % per) * rh, rh, r0, r1, 0, c1, true});
        }
      continue;
    }
    shared_merge = shared_merge || n > 1;
    // a KV head's chunks one after the other: a thread's contiguous range of tasks then reads its keys
    // as one stream (chunk c + 1 follows chunk c in the cache; chunks outermost measured 1.06x the time
    // at 1,000 keys)
    for (int64_t sub = 0; sub < KV * (group / heads); ++sub)
      for (int64_t c = 0; c < n; ++c)
        tasks.push_back({g, sub / (group / heads), (sub / (group / heads)) * group + (sub % (group / heads)) * heads,
                         heads, b, e, c, c + 1, false});
  }
  const bool wide = use_avx512() && avx512::head_dim_ok(D);  // decode_attn_avx512.cpp: 16 columns a step
  // [M * H, chunks, D + 2]: each chunk's (max, sum, weighted sum) of chunk tasks' queries with several.
  // Kept by the calling thread from layer to layer: every slot a merge reads is written first, and a
  // fresh vector zero-filled (and, past malloc's mmap threshold, page-faulted) its megabytes every
  // layer at long contexts (16 rows x 32K keys: ~10 MB a layer).
  thread_local std::vector<float> part_buf;
  const int64_t part_size = shared_merge ? M * H * chunks * (D + 2) : 0;
  if (static_cast<int64_t>(part_buf.size()) < part_size) part_buf.resize(part_size);
  float* const part = part_buf.data();
  auto run = [&](const AttnTask& tk) {
    // a thread's scratch, kept from call to call (30 layers x 2 threads a step would otherwise allocate
    // ~400 small vectors)
    thread_local TaskScratch scratch;
    auto& [p, q, o, sums, S, total, mx, lp] = scratch;
    const int64_t nh = tk.heads, lead = groups.lead[tk.g], j = tk.j;
    const int64_t span = tk.c1 - tk.c0;  // a row-block task's chunks: its partial slots per query
    if (tk.own_merge) lp.resize((tk.r1 - tk.r0) * nh * span * (D + 2));
    for (int64_t c = tk.c0; c < tk.c1; ++c) {
      const int64_t first = c * kKeyChunk;
      q.clear(), o.clear(), sums.clear(), S.clear();
      int64_t stride = 0;
      for (int64_t m = tk.r0; m < tk.r1; ++m) {
        const int64_t keys = pos[m] + 1, n = key_chunks(keys);
        if (keys <= first) continue;
        stride = std::max(stride, std::min(keys - first, kKeyChunk));
        for (int64_t h = tk.h0; h < tk.h0 + nh; ++h) {
          q.push_back(qrp + (m * H + h) * D), S.push_back(std::min(keys - first, kKeyChunk));
          float* slot = nullptr;
          if (n > 1)
            slot = tk.own_merge ? lp.data() + (((m - tk.r0) * nh + (h - tk.h0)) * span + c) * (D + 2)
                                : part + ((m * H + h) * chunks + c) * (D + 2);
          o.push_back(slot ? slot + 2 : op + (m * H + h) * D), sums.push_back(slot);
        }
      }
      const int64_t Q = static_cast<int64_t>(q.size());
      if (Q == 0) continue;  // every row of the task is shorter than this chunk
      p.resize(Q * stride);
      const int64_t* idx = rows.read ? rows.read + (lead * KV + j) * rows.S + first : nullptr;
      // limit: rows past the chunk up to the lead row's last key (the next chunk's), prefetched at its end
      const KeyRows keys{idx, (rows.slots[lead] * KV + j) * max_seq + first, pos[lead] + 1 - first};
      const avx512::KvRows kv{keys.idx, keys.base, keys.limit};
      if (wide) {
        avx512::scores(q.data(), S.data(), Q, kp, ksp, kv, D, scale, p.data(), stride);
      } else {
        for (int64_t i = 0; i < Q; ++i)  // the first query requests the rows ahead for all (limit -1: none)
          scores(q[i], kp, ksp, i ? KeyRows{keys.idx, keys.base, -1} : keys, S[i], D, scale, p.data() + i * stride);
      }
      total.resize(Q), mx.resize(Q);
      for (int64_t i = 0; i < Q; ++i) total[i] = softmax_unnormalised(p.data() + i * stride, S[i], &mx[i]);
      if (wide) {
        avx512::weighted_sum(p.data(), stride, S.data(), Q, vp, vsp, kv, D, o.data());
      } else {
        for (int64_t i = 0; i < Q; ++i)
          weighted_sum(p.data() + i * stride, vp, vsp, i ? KeyRows{keys.idx, keys.base, -1} : keys, S[i], D, o[i]);
      }
      for (int64_t i = 0; i < Q; ++i) {
        if (sums[i]) {  // one chunk of several: merged below
          sums[i][0] = mx[i], sums[i][1] = total[i];
          continue;
        }
        const float inv = 1.0f / total[i];
        for (int64_t d = 0; d < D; ++d) o[i][d] *= inv;
      }
    }
    if (tk.own_merge)
      for (int64_t m = tk.r0; m < tk.r1; ++m) {
        const int64_t n = key_chunks(pos[m] + 1);
        for (int64_t h = tk.h0; n > 1 && h < tk.h0 + nh; ++h)
          merge_chunks(lp.data() + ((m - tk.r0) * nh + (h - tk.h0)) * span * (D + 2), n, D, op + (m * H + h) * D);
      }
  };
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const bool blocks = std::any_of(tasks.begin(), tasks.end(), [](const AttnTask& t) { return t.own_merge; });
  if (work < (1 << 12) || n_tasks == 1 || threads == 1) {
    for (const AttnTask& tk : tasks) run(tk);
  } else if (!blocks) {  // tasks of about one size: a contiguous range each (taken in turn, the thread
    // that forks first took 4 of 6 at one row and 200 keys while the other started)
    parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run(tasks[t]);
    });
  } else {
    // Row-block tasks differ in length (later rows read more keys): the threads take tasks in turn,
    // the longest first, instead of one contiguous range each.
    std::stable_sort(tasks.begin(), tasks.end(), [](const AttnTask& x, const AttnTask& y) { return x.c1 > y.c1; });
    std::atomic<int64_t> next{0};
    parallel_for(0, std::min(threads, n_tasks), 1, [&](int64_t, int64_t) {
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) run(tasks[t]);
    });
  }
  if (shared_merge)  // the chunk tasks' queries with several chunks, over the threads
    parallel_for(0, M * H, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / H, n = key_chunks(pos[m] + 1);
        const int64_t g = std::upper_bound(groups.start.begin(), groups.start.end(), m) - groups.start.begin() - 1;
        if (n > 1 && groups.start[g + 1] - groups.start[g] < kRowBlock)
          merge_chunks(part + i * chunks * (D + 2), n, D, op + i * D);
      }
    });
}

}  // namespace
}  // namespace leanformer
