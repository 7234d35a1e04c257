// What every Communicator backend must do, written once and run on every rank: by the
// thread backend in tests/comm (ranks as threads) and by MPI in tests/dist (ranks as
// processes under mpirun). Each function is one behaviour; every rank calls it.
//
// Expected values are in closed form. Inputs are small integers, so every sum, max and
// average below is exact in every element type: comparisons are exact, with no
// tolerance, whatever order a backend adds in.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/base/timer.hpp"
#include "flotilla/comm/algorithms/all_to_all_v.hpp"
#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm::spec {

// Buffer lengths: empty, one element, odd, and odd and long enough for several
// segments in any algorithm that cuts buffers.
inline constexpr size_t kLengths[] = {0, 1, 7, 1023};

// Calls f.template operator()<T>() for every element type comm accepts from C++.
template <class F>
void for_each_element_type(F&& f) {
  f.template operator()<float>();
  f.template operator()<double>();
  f.template operator()<int32_t>();
  f.template operator()<uint32_t>();
  f.template operator()<int64_t>();
  f.template operator()<uint8_t>();
  f.template operator()<int8_t>();
}

template <class T>
constexpr bool is_float_v = std::is_floating_point_v<T>;

template <class T>
std::string type_label() {
  return std::string(element_name(element_type_of<T>()));
}

inline void expect_contains(const std::string& text, const std::string& part) {
  EXPECT_NE(text.find(part), std::string::npos) << "expected \"" << part << "\" in: " << text;
}

// Rank r contributes (r + 1) * (1 + i % 3) at index i: over n ranks the sum is
// n (n + 1) / 2 * (1 + i % 3), the max n * (1 + i % 3), the average (n + 1) / 2 * (...).
inline void all_reduce_closed_form(Communicator& c) {
  const int n = c.size();
  const int r = c.rank();
  for_each_element_type([&]<class T>() {
    std::vector<ReduceOp> ops = {ReduceOp::sum, ReduceOp::max};
    if (is_float_v<T>) ops.push_back(ReduceOp::avg);
    for (size_t len : kLengths) {
      std::vector<T> in(len);  // (len)
      for (size_t i = 0; i < len; ++i) in[i] = static_cast<T>((r + 1) * (1 + i % 3));
      for (ReduceOp op : ops) {
        auto expected = [&](size_t i) {
          const double k = 1 + i % 3;
          switch (op) {
            case ReduceOp::sum: return static_cast<T>(n * (n + 1) / 2 * k);
            case ReduceOp::max: return static_cast<T>(n * k);
            case ReduceOp::avg: return static_cast<T>((n + 1) / 2.0 * k);
          }
          return T{};
        };
        const std::string what = type_label<T>() + " " + std::string(reduce_name(op)) +
                                 " len " + std::to_string(len);
        std::vector<T> out(len, static_cast<T>(77));
        const std::vector<T> in_before = in;
        c.all_reduce(in, out, op, {.name = "spec"});
        for (size_t i = 0; i < len; ++i) ASSERT_EQ(out[i], expected(i)) << what << " at " << i;
        EXPECT_EQ(in, in_before) << what << ": out of place must leave in alone";

        std::vector<T> data = in;
        c.all_reduce(data, op, {.name = "spec in place"});
        for (size_t i = 0; i < len; ++i)
          ASSERT_EQ(data[i], expected(i)) << what << " in place at " << i;
      }
    }
  });
}

// The root holds i % 100 + root at index i; everyone ends with it, for every root.
inline void broadcast_from_every_root(Communicator& c) {
  for_each_element_type([&]<class T>() {
    for (size_t len : kLengths)
      for (int root = 0; root < c.size(); ++root) {
        std::vector<T> data(len, static_cast<T>(0));
        if (c.rank() == root)
          for (size_t i = 0; i < len; ++i) data[i] = static_cast<T>(i % 100 + root);
        c.broadcast(data, root, {.name = "spec"});
        for (size_t i = 0; i < len; ++i)
          ASSERT_EQ(data[i], static_cast<T>(i % 100 + root))
              << type_label<T>() << " len " << len << " root " << root << " at " << i;
      }
  });
}

// Rank s contributes s * 10 + i % 7 at index i; chunk s of everyone's out is rank s's.
inline void all_gather_closed_form(Communicator& c) {
  const int n = c.size();
  for_each_element_type([&]<class T>() {
    for (size_t len : kLengths) {
      std::vector<T> in(len);  // (len)
      for (size_t i = 0; i < len; ++i) in[i] = static_cast<T>(c.rank() * 10 + i % 7);
      std::vector<T> out(len * n, static_cast<T>(99));  // (n, len)
      c.all_gather(in, out, {.name = "spec"});
      for (int s = 0; s < n; ++s)
        for (size_t i = 0; i < len; ++i)
          ASSERT_EQ(out[s * len + i], static_cast<T>(s * 10 + i % 7))
              << type_label<T>() << " len " << len << " chunk " << s << " at " << i;
    }
  });
}

// Rank s puts (s + 1) + j + i % 3 at index i of chunk j. Rank r receives chunk r reduced
// over s: sum n (n + 1) / 2 + n (r + i % 3), max n + r + i % 3, avg (n + 1) / 2 + r + i % 3.
inline void reduce_scatter_closed_form(Communicator& c) {
  const int n = c.size();
  const int r = c.rank();
  for_each_element_type([&]<class T>() {
    std::vector<ReduceOp> ops = {ReduceOp::sum, ReduceOp::max};
    if (is_float_v<T>) ops.push_back(ReduceOp::avg);
    for (size_t len : kLengths)
      for (ReduceOp op : ops) {
        std::vector<T> in(len * n);  // (n, len)
        for (int j = 0; j < n; ++j)
          for (size_t i = 0; i < len; ++i)
            in[j * len + i] = static_cast<T>((r + 1) + j + i % 3);
        std::vector<T> out(len, static_cast<T>(99));  // (len)
        c.reduce_scatter(in, out, op, {.name = "spec"});
        for (size_t i = 0; i < len; ++i) {
          const double rest = r + static_cast<double>(i % 3);
          const double want = op == ReduceOp::sum   ? n * (n + 1) / 2 + n * rest
                              : op == ReduceOp::max ? n + rest
                                                    : (n + 1) / 2.0 + rest;
          ASSERT_EQ(out[i], static_cast<T>(want))
              << type_label<T>() << " " << reduce_name(op) << " len " << len << " at " << i;
        }
      }
  });
}

// Rank s puts s * 16 + j * 4 + i % 4 at index i of chunk j (at most 63: fits int8).
// Rank r's out chunk j is chunk r of rank j's in.
inline void all_to_all_closed_form(Communicator& c) {
  const int n = c.size();
  const int r = c.rank();
  for_each_element_type([&]<class T>() {
    for (size_t len : kLengths) {
      std::vector<T> in(len * n);  // (n, len)
      for (int j = 0; j < n; ++j)
        for (size_t i = 0; i < len; ++i) in[j * len + i] = static_cast<T>(r * 16 + j * 4 + i % 4);
      std::vector<T> out(len * n, static_cast<T>(99));  // (n, len)
      c.all_to_all(in, out, {.name = "spec"});
      for (int j = 0; j < n; ++j)
        for (size_t i = 0; i < len; ++i)
          ASSERT_EQ(out[j * len + i], static_cast<T>(j * 16 + r * 4 + i % 4))
              << type_label<T>() << " len " << len << " chunk " << j << " at " << i;
    }
  });
}

// bf16 and f16 move as bytes (broadcast, all_gather, all_to_all) but are not reduced.
inline void half_types_move_but_do_not_reduce(Communicator& c) {
  const int n = c.size();
  for (ElementType type : {ElementType::bf16, ElementType::f16}) {
    std::vector<uint16_t> data(7);  // (7) raw 16-bit elements
    for (size_t i = 0; i < data.size(); ++i) data[i] = c.rank() == 0 ? 0x3f80 + i : 0;
    c.broadcast(MutView(std::as_writable_bytes(std::span(data)), type, data.size()), 0);
    for (size_t i = 0; i < data.size(); ++i) EXPECT_EQ(data[i], 0x3f80 + i);

    std::vector<uint16_t> gathered(7 * n);  // (n, 7)
    c.all_gather(ConstView(std::as_bytes(std::span(data)), type, data.size()),
                 MutView(std::as_writable_bytes(std::span(gathered)), type, gathered.size()));
    for (int s = 0; s < n; ++s) EXPECT_EQ(gathered[s * 7 + 3], 0x3f83);

    try {
      c.all_reduce(MutView(std::as_writable_bytes(std::span(data)), type, data.size()),
                   ReduceOp::sum);
      ADD_FAILURE() << "all_reduce of " << element_name(type) << " must be refused";
    } catch (const Error& e) {
      expect_contains(e.what(), "all_reduce: sum of " + std::string(element_name(type)) +
                                    " is not supported (reduce in f32)");
    }
  }
  // An average of integers would truncate: refused on every rank alike, before any
  // communication, so the ranks stay in step.
  std::vector<int32_t> ints(3, 1);
  try {
    c.all_reduce(ints, ReduceOp::avg);
    ADD_FAILURE() << "avg of i32 must be refused";
  } catch (const Error& e) {
    expect_contains(e.what(), "avg of i32 is not supported");
  }
  c.barrier();
}

inline void barrier_many_times(Communicator& c) {
  for (int i = 0; i < 20; ++i) c.barrier({.name = "spec"});
  SUCCEED();
}

// Even and odd ranks form two groups, ordered by descending world rank (key = -rank);
// collectives within each see only its members.
inline void split_even_odd(Communicator& c) {
  const int n = c.size();
  const int r = c.rank();
  std::vector<int> members;  // world ranks of this rank's group, in group order
  for (int s = n - 1; s >= 0; --s)
    if (s % 2 == r % 2) members.push_back(s);
  auto group = c.split(r % 2, -r, {.name = "parity"});
  ASSERT_NE(group, nullptr);
  ASSERT_EQ(group->size(), static_cast<int>(members.size()));
  const int expected_rank =
      static_cast<int>(std::find(members.begin(), members.end(), r) - members.begin());
  EXPECT_EQ(group->rank(), expected_rank);
  // The tests run on one host, so the whole group is local.
  EXPECT_EQ(group->local_size(), group->size());
  EXPECT_EQ(group->local_rank(), group->rank());
  EXPECT_EQ(group->host_name(), c.host_name());

  std::vector<int64_t> mine = {r + 1, 1};
  group->all_reduce(mine, ReduceOp::sum, {.name = "members"});
  int64_t want = 0;
  for (int s : members) want += s + 1;
  EXPECT_EQ(mine[0], want);
  EXPECT_EQ(mine[1], static_cast<int64_t>(members.size()));

  std::vector<int32_t> from_root = {group->rank() == 0 ? r : -1};
  group->broadcast(from_root, 0);
  EXPECT_EQ(from_root[0], members[0]);

  std::vector<int32_t> ranks(members.size());
  group->all_gather(std::vector<int32_t>{r}, ranks);
  EXPECT_EQ(ranks, members);

  // A group of a group, and the parent still works alongside.
  auto single = group->split(group->rank(), 0);
  ASSERT_NE(single, nullptr);
  EXPECT_EQ(single->size(), 1);
  c.barrier();
}

// A negative color takes part in the split and gets no group.
inline void split_without_color(Communicator& c) {
  auto rest = c.split(c.rank() == 0 ? -1 : 7, c.rank());
  if (c.rank() == 0) {
    EXPECT_EQ(rest, nullptr);
  } else {
    ASSERT_NE(rest, nullptr);
    EXPECT_EQ(rest->size(), c.size() - 1);
    EXPECT_EQ(rest->rank(), c.rank() - 1);
    std::vector<int32_t> one = {1};
    rest->all_reduce(one, ReduceOp::sum);
    EXPECT_EQ(one[0], c.size() - 1);
  }
  c.barrier();
}

// Each rank sends to its right neighbour and receives from its left, nonblocking, twice
// on the same tag (messages between a pair arrive in order). Needs size >= 2.
inline void ring_exchange_nonblocking(Communicator& c) {
  const int n = c.size();
  const int r = c.rank();
  const int right = (r + 1) % n;
  const int left = (r + n - 1) % n;
  for (size_t len : kLengths) {
    std::vector<int64_t> first(len, 1000 + r), second(len, 2000 + r);
    std::vector<int64_t> got_first(len, -1), got_second(len, -1);
    Request recv_first = c.irecv(got_first, left, 5);
    Request recv_second = c.irecv(got_second, left, 5);
    Request send_first = c.isend(first, right, 5);
    Request send_second = c.isend(second, right, 5);
    std::vector<Request> all;
    all.push_back(std::move(recv_first));
    all.push_back(std::move(recv_second));
    all.push_back(std::move(send_first));
    all.push_back(std::move(send_second));
    wait_all(all);
    for (const Request& q : all) EXPECT_FALSE(q.active());
    EXPECT_EQ(got_first, std::vector<int64_t>(len, 1000 + left)) << "len " << len;
    EXPECT_EQ(got_second, std::vector<int64_t>(len, 2000 + left)) << "len " << len;
  }
  c.barrier();
}

// Blocking send/recv between pairs (0,1), (2,3), ...; an odd rank out sits it out.
inline void blocking_pairs(Communicator& c) {
  const int r = c.rank();
  const int partner = r % 2 == 0 ? r + 1 : r - 1;
  if (partner < c.size()) {
    std::vector<float> out(1023, static_cast<float>(r)), in(1023, -1.0f);
    if (r % 2 == 0) {
      c.send(out, partner, 1);
      c.recv(in, partner, 2);
    } else {
      c.recv(in, partner, 1);
      c.send(out, partner, 2);
    }
    EXPECT_EQ(in, std::vector<float>(1023, static_cast<float>(partner)));
  }
  c.barrier();
}

// A message shorter than the receive buffer is an error at the receiver, not a silent
// partial fill. Needs size >= 2.
inline void recv_of_wrong_size_is_an_error(Communicator& c) {
  if (c.rank() == 0) {
    std::vector<int32_t> two = {1, 2};
    c.send(two, 1, 3);
  } else if (c.rank() == 1) {
    std::vector<int32_t> four(4);
    try {
      c.recv(four, 0, 3);
      ADD_FAILURE() << "a short message must not complete a longer receive";
    } catch (const Error& e) {
      expect_contains(e.what(), "rank 1: recv from rank 0 (tag 3, 4 x i32): the message has 8 "
                                "bytes, the buffer 16");
    }
  }
  c.barrier();
}

// A receive nobody answers: waiting gives a TimeoutError naming the peer; dropping the
// request cancels it promptly. Needs size >= 2.
inline void unanswered_recv_times_out_and_cancels(Communicator& c) {
  const int left = (c.rank() + c.size() - 1) % c.size();
  std::vector<int32_t> buffer(3);
  {
    Request pending = c.irecv(buffer, left, 9);
    Timer timer;
    try {
      pending.wait(std::chrono::milliseconds(100));
      ADD_FAILURE() << "nobody sends on tag 9";
    } catch (const TimeoutError& e) {
      EXPECT_EQ(std::string(e.what()),
                "[comm/" + std::string(c.backend()) + "] rank " + std::to_string(c.rank()) +
                    ": recv from rank " + std::to_string(left) +
                    " (tag 9, 3 x i32) timed out after 0.1 s waiting for ranks [" +
                    std::to_string(left) + "]");
    }
    EXPECT_GE(timer.elapsed_s(), 0.1);
    EXPECT_LT(timer.elapsed_s(), 2.0);  // deadline plus polling and scheduling slack
    EXPECT_TRUE(pending.active());
    Timer cancel_timer;
    pending = Request();  // the destructor's cancel
    EXPECT_LT(cancel_timer.elapsed_s(), 1.0);
  }
  {
    Request dropped = c.irecv(buffer, left, 10);
  }  // cancelled on destruction, without a wait
  c.barrier();
}

// Rank 1 broadcasts "params" while everyone else all-reduces "grads": every rank gets
// the same MismatchError naming both groups, and the communicator stays usable.
inline void mismatch_names_ranks_and_operations(Communicator& c) {
  const int n = c.size();
  const uint64_t seq = c.collectives_started() + 1;
  std::string others = n == 2 ? "rank 0" : "ranks 0";
  for (int s = 2; s < n; ++s) others += ", " + std::to_string(s);
  const std::string expected = "[comm] collective mismatch at #" + std::to_string(seq) + ": " +
                               others + " all_reduce(grads, 1024 x f32, sum) vs rank 1 " +
                               "broadcast(params, 1024 x f32, root 0)";
  std::vector<float> buffer(1024, 1.0f);
  try {
    if (c.rank() == 1)
      c.broadcast(buffer, 0, {.name = "params"});
    else
      c.all_reduce(buffer, ReduceOp::sum, {.name = "grads"});
    ADD_FAILURE() << "rank " << c.rank() << " ran a mismatched collective";
  } catch (const MismatchError& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
  EXPECT_EQ(buffer, std::vector<float>(1024, 1.0f)) << "no data may move on a mismatch";

  // Same operation, different count on rank 0.
  std::vector<float> counted(c.rank() == 0 ? 7 : 8, 1.0f);
  try {
    c.all_reduce(counted, ReduceOp::sum, {.name = "x"});
    ADD_FAILURE() << "rank " << c.rank() << " ran with a mismatched count";
  } catch (const MismatchError& e) {
    expect_contains(e.what(), "rank 0 all_reduce(x, 7 x f32, sum) vs rank");
    expect_contains(e.what(), " all_reduce(x, 8 x f32, sum)");
  }

  std::vector<float> after(5, 1.0f);
  c.all_reduce(after, ReduceOp::sum);
  EXPECT_EQ(after, std::vector<float>(5, static_cast<float>(n)));
}

// The last rank stays silent past a short deadline: the others get a TimeoutError
// naming it, within the bound. It runs on a group of its own, which ends unusable.
// `names_late_ranks`: whether this backend's check can tell who is late.
inline void silent_rank_times_out(Communicator& c, bool names_late_ranks = true) {
  const int n = c.size();
  const int silent = n - 1;
  auto group = c.split(0, c.rank(), {.name = "timeout test"});
  ASSERT_NE(group, nullptr);
  const auto timeout = std::chrono::milliseconds(300);
  if (c.rank() == silent) {
    std::this_thread::sleep_for(timeout + std::chrono::milliseconds(700));
  } else {
    std::vector<float> grads(16, 1.0f);
    Timer timer;
    try {
      group->all_reduce(grads, ReduceOp::sum, {.name = "grads", .timeout = timeout});
      ADD_FAILURE() << "rank " << c.rank() << " finished an all_reduce without rank " << silent;
    } catch (const TimeoutError& e) {
      const std::string prefix = "[comm/" + std::string(c.backend()) + "] rank " +
                                 std::to_string(c.rank()) +
                                 ": all_reduce #1 (grads) timed out after 0.3 s ";
      if (names_late_ranks)
        EXPECT_EQ(std::string(e.what()),
                  prefix + "waiting for ranks [" + std::to_string(silent) + "]");
      else
        expect_contains(e.what(), prefix);
    }
    EXPECT_GE(timer.elapsed_s(), 0.3);
    EXPECT_LT(timer.elapsed_s(), 0.3 + 1.0);  // polling overshoot is ~1 ms; the rest is slack
    try {
      group->barrier();
      ADD_FAILURE() << "a communicator that timed out must refuse further work";
    } catch (const TimeoutError&) {
      ADD_FAILURE() << "the refusal must be immediate, not another timeout";
    } catch (const Error& e) {
      expect_contains(e.what(), "unusable since all_reduce #1 (grads) timed out");
    }
  }
  c.barrier({.name = "after timeout test"});
}

// all_to_all_v (comm/algorithms/all_to_all_v.hpp): random per-pair counts, zeros included,
// drawn from a seed every rank shares; four calls in a row.
// Element i of what rank `from` sends rank `to`: distinct in every argument, exact in f32.
inline float a2av_value(int from, int to, int64_t i) { return static_cast<float>(from * 100000 + to * 1000 + i % 1000); }

// counts[from][to] for one call: drawn from a seed every rank shares.
inline std::vector<std::vector<int64_t>> a2av_counts(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, 4);
  std::vector<std::vector<int64_t>> counts(static_cast<size_t>(n), std::vector<int64_t>(static_cast<size_t>(n)));
  for (auto& row : counts)
    for (int64_t& c : row) {
      const int kind = pick(rng);  // 0: none, 1: one, else up to a few thousand
      c = kind == 0 ? 0 : kind == 1 ? 1 : std::uniform_int_distribution<int64_t>(2, 3000)(rng);
    }
  return counts;
}

inline void all_to_all_v_closed_form(Communicator& c, uint64_t seed) {
  const int n = c.size(), me = c.rank();
  for (int call = 0; call < 4; ++call) {
    const auto counts = a2av_counts(seed + static_cast<uint64_t>(call), n);
    const std::vector<int64_t>& send_counts = counts[static_cast<size_t>(me)];
    std::vector<float> in;
    for (int to = 0; to < n; ++to)
      for (int64_t i = 0; i < send_counts[static_cast<size_t>(to)]; ++i) in.push_back(a2av_value(me, to, i));
    const std::vector<int64_t> recv_counts = exchange_counts(c, send_counts, {.name = "counts"});
    for (int from = 0; from < n; ++from)
      ASSERT_EQ(recv_counts[static_cast<size_t>(from)], counts[static_cast<size_t>(from)][static_cast<size_t>(me)]);
    int64_t total = 0;
    for (int64_t r : recv_counts) total += r;
    std::vector<float> out(static_cast<size_t>(total) + 1, -7.0f);  // one sentinel past the end
    all_to_all_v(c, ConstView(std::span<const float>(in)), send_counts,
                 MutView(std::span<float>(out.data(), static_cast<size_t>(total))), recv_counts, {.name = "rows"});
    size_t at = 0;
    for (int from = 0; from < n; ++from)
      for (int64_t i = 0; i < recv_counts[static_cast<size_t>(from)]; ++i, ++at)
        ASSERT_EQ(out[at], a2av_value(from, me, i)) << "rank " << me << " from " << from << " element " << i;
    ASSERT_EQ(out.back(), -7.0f) << "wrote past the end";
  }
}

}  // namespace flotilla::comm::spec
