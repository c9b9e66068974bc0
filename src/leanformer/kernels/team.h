// One parallel region for a whole fused decode step (decode.cpp): the calling thread drives the step
// and hands each parallel piece (GEMV row blocks, attention tasks) to threads that wait for it spinning,
// instead of opening a new OpenMP region for every piece.
//
// Why: a SmolLM2 decode step runs ~150 parallel pieces of 2-20 us each. Opening a region for each costs
// ~0.5 us on the calling thread, and the worker starts ~0.6 us after it (traced on 2 Zen 5 cores,
// docs/BENCHMARKS.md sessions 17-18) — ~5% of a token. Torch's OpenMP pool only: it runs every thread of
// a region at once, which members waiting for each other need. Inside one region a piece is posted by bumping one
// counter the waiting threads poll (one cache line each way).
//
// How the kernels use it: `parallel_for` and `num_threads` below stand in for at::parallel_for and
// at::get_num_threads. On a thread that drives a team they split the range exactly as at::parallel_for
// does (OpenMP: one contiguous chunk per thread, member m taking chunk m), so results and the rows each
// thread streams are the same as without the team; anywhere else they are torch's. Any other
// at::parallel_for reached inside the region runs on the calling thread (torch's nested-region rule):
// slower, never wrong.
#pragma once

#include <ATen/Config.h>  // AT_PARALLEL_OPENMP
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>

namespace leanformer {

// Waits until ready() holds: spinning (a piece is posted every few microseconds), then yielding the
// core after ~20 us, so that more threads than cores (a user's set_num_threads) do not spin away the
// time slices of the threads they wait for (3 threads on 2 cores: 6 ms a piece without the yield).
template <class Ready>
inline void wait_until(const Ready& ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins < (1 << 11))
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

class Team {
 public:
  // Runs body() on this thread with the other threads of torch's pool waiting for its pieces; a
  // single thread, or a call from inside a parallel region, runs body() alone.
  template <class Body>
  static void run(const Body& body) {
#if !AT_PARALLEL_OPENMP
    return body();  // another pool need not run all its tasks at once: members could wait forever
#endif
    const int64_t threads = at::get_num_threads();
    // more threads than CPUs to run them (a user's set_num_threads): waiting threads would take the
    // CPUs of the ones they wait for (3 threads on 2 cores: 1.25x the time of one region per piece)
    if (threads <= 1 || threads > usable_cpus() || at::in_parallel_region() || current()) return body();
    Team team;
    std::exception_ptr error;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      // at::parallel_for gives thread i the chunk [i * c, (i + 1) * c) with c = t1 - t0 on thread 0
      if (t0 == 0) {
        team.chunk_ = t1 - t0;
        team.members_ = (threads + team.chunk_ - 1) / team.chunk_;
        team.ready_.store(true, std::memory_order_release);
        Driving driving(team);
        try {
          body();
        } catch (...) {
          error = std::current_exception();
        }
      } else {
        wait_until([&] { return team.ready_.load(std::memory_order_acquire); });
        team.serve(t0 / team.chunk_);
      }
    });
    if (error) std::rethrow_exception(error);
  }

  // The CPUs this process may run on (its affinity mask), found once.
  static int64_t usable_cpus() {
    static const int64_t n = [] {
      cpu_set_t set;
      return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : std::thread::hardware_concurrency();
    }();
    return n;
  }

  // The team this thread drives, or null.
  static Team*& current() {
    static thread_local Team* team = nullptr;
    return team;
  }

  int64_t members() const { return members_; }

  // fn(member) on every member, this thread being member 0; returns when all are done.
  template <class Fn>
  void each(const Fn& fn) {
    call_ = [](const void* f, int64_t member) { (*static_cast<const Fn*>(f))(member); };
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    posted_.fetch_add(1, std::memory_order_release);
    fn(0);
    wait_until([&] { return done_.load(std::memory_order_acquire) >= members_ - 1; });
    if (failed_.load(std::memory_order_acquire)) {
      failed_.store(false, std::memory_order_relaxed);
      std::rethrow_exception(worker_error_);
    }
  }

 private:
  // Marks this thread as the team's driver; on leaving (also by an exception) tells the members to stop.
  struct Driving {
    Team& team;
    explicit Driving(Team& t) : team(t) { current() = &t; }
    ~Driving() {
      current() = nullptr;
      team.stop_ = true;
      team.posted_.fetch_add(1, std::memory_order_release);
    }
  };

  void serve(int64_t member) {
    uint64_t seen = 0;
    while (true) {
      uint64_t p;
      wait_until([&] { return (p = posted_.load(std::memory_order_acquire)) != seen; });
      seen = p;
      if (stop_) return;
      try {
        call_(fn_, member);
      } catch (...) {  // a piece's error goes to the driver (at most one kept)
        if (!failed_.exchange(true, std::memory_order_acq_rel)) worker_error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  int64_t members_ = 1, chunk_ = 1;  // threads in the region; the region's tasks per thread
  void (*call_)(const void*, int64_t) = nullptr;
  const void* fn_ = nullptr;
  bool stop_ = false;
  std::exception_ptr worker_error_;
  alignas(64) std::atomic<uint64_t> posted_{0};  // pieces posted (and the stop)
  alignas(64) std::atomic<int64_t> done_{0};     // members other than the driver done with the piece
  alignas(64) std::atomic<bool> ready_{false};
  std::atomic<bool> failed_{false};
};

// at::get_num_threads, or the members of the team this thread drives.
inline int64_t num_threads() {
  const Team* t = Team::current();
  return t ? t->members() : at::get_num_threads();
}

// at::parallel_for(begin, end, grain, fn), on the team this thread drives when there is one (the same
// chunks: n = min(members, ceil(range / grain)) threads, member m taking [begin + m * c, + c) with
// c = ceil(range / n); a range of at most `grain` runs here).
template <class Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  Team* t = Team::current();
  if (!t) return at::parallel_for(begin, end, grain, fn);
  if (begin >= end) return;
  const int64_t range = end - begin;
  if (range <= grain || range == 1 || t->members() == 1) return fn(begin, end);
  const int64_t n = std::min<int64_t>(t->members(), grain > 0 ? (range + grain - 1) / grain : range);
  const int64_t chunk = (range + n - 1) / n;
  t->each([&](int64_t member) {
    const int64_t b = begin + member * chunk;
    if (b < end) fn(b, std::min(end, b + chunk));
  });
}

}  // namespace leanformer
