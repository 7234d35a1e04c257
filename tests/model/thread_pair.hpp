// Two tensor-parallel ranks as threads of one process, for the model tests: a
// TensorParallelGroup whose collectives meet at a barrier.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <span>
#include <vector>

#include "flotilla/model/tensor_parallel.hpp"

namespace flotilla::model::test_models {

// Two ranks as threads: each all-reduce adds the two ranks' buffers in rank order, so both
// get the same bits, as MPI's two-rank sum does.
class ThreadPair {
 public:
  class Rank final : public TensorParallelGroup {
   public:
    Rank(ThreadPair& pair, int rank) : pair_(pair), rank_(rank) {}
    int tp_size() const override { return 2; }
    int tp_rank() const override { return rank_; }
    void all_reduce_sum(std::span<float> v, const char*) override { pair_.reduce(rank_, v); }
    void all_reduce_sum(std::span<double> v, const char*) override { pair_.reduce(rank_, v); }
    void all_reduce_max(std::span<float> v, const char*) override { pair_.reduce(rank_, v, true); }
    void all_gather(std::span<const float> slice, std::span<float> whole, const char*) override {
      pair_.gather(rank_, slice, whole);
    }
    void reduce_scatter_sum(std::span<const float> whole, std::span<float> slice, const char*) override {
      std::vector<float> sum(whole.begin(), whole.end());
      pair_.reduce(rank_, std::span<float>(sum));
      std::copy_n(sum.begin() + static_cast<std::ptrdiff_t>(rank_ * slice.size()), slice.size(), slice.begin());
    }

   private:
    ThreadPair& pair_;
    int rank_;
  };

  void gather(int rank, std::span<const float> slice, std::span<float> whole) {
    slots_[rank] = slice.data();
    sync_.arrive_and_wait();
    for (int r = 0; r < 2; ++r)
      std::copy_n(static_cast<const float*>(slots_[r]), slice.size(), whole.begin() + static_cast<std::ptrdiff_t>(r * slice.size()));
    sync_.arrive_and_wait();  // both have read both slices
  }

  template <class T>
  void reduce(int rank, std::span<T> v, bool max = false) {
    slots_[rank] = v.data();
    sync_.arrive_and_wait();
    std::vector<T> sum(v.size());
    const T* a = static_cast<const T*>(slots_[0]);
    const T* b = static_cast<const T*>(slots_[1]);
    for (size_t i = 0; i < v.size(); ++i) sum[i] = max ? std::max(a[i], b[i]) : a[i] + b[i];
    sync_.arrive_and_wait();  // both have read both inputs
    std::copy(sum.begin(), sum.end(), v.begin());
  }

 private:
  std::barrier<> sync_{2};
  const void* slots_[2] = {nullptr, nullptr};
};

}  // namespace flotilla::model::test_models
