// Signatures and the mismatch message, independent of any backend.
#include <gtest/gtest.h>

#include <vector>

#include "flotilla/comm/signature.hpp"

namespace flotilla::comm {
namespace {

Signature all_reduce_grads(uint64_t seq = 17, uint64_t count = 1024) {
  return Signature::make(seq, CollectiveKind::all_reduce, "grads", count, ElementType::f32, -1,
                         ReduceOp::sum);
}
Signature broadcast_params(uint64_t seq = 17) {
  return Signature::make(seq, CollectiveKind::broadcast, "params", 1024, ElementType::f32, 0,
                         ReduceOp::sum);
}

TEST(CommSignature, DescribesEachKind) {
  EXPECT_EQ(all_reduce_grads().describe(), "all_reduce(grads, 1024 x f32, sum)");
  EXPECT_EQ(broadcast_params().describe(), "broadcast(params, 1024 x f32, root 0)");
  EXPECT_EQ(Signature::make(1, CollectiveKind::all_gather, "", 7, ElementType::i64, -1,
                            ReduceOp::sum)
                .describe(),
            "all_gather(7 x i64)");
  EXPECT_EQ(Signature::make(1, CollectiveKind::reduce_scatter, "g", 3, ElementType::f64, -1,
                            ReduceOp::avg)
                .describe(),
            "reduce_scatter(g, 3 x f64, avg)");
  EXPECT_EQ(Signature::make(1, CollectiveKind::barrier, "", 0, ElementType::u8, -1,
                            ReduceOp::sum)
                .describe(),
            "barrier()");
  EXPECT_EQ(Signature::make(1, CollectiveKind::split, "parity", 0, ElementType::u8, -1,
                            ReduceOp::sum)
                .describe(),
            "split(parity)");
}

TEST(CommSignature, HashCoversEveryField) {
  const uint64_t base = all_reduce_grads().hash;
  EXPECT_EQ(all_reduce_grads().hash, base) << "the hash must be deterministic";
  EXPECT_NE(all_reduce_grads(18).hash, base);
  EXPECT_NE(all_reduce_grads(17, 1023).hash, base);
  EXPECT_NE(Signature::make(17, CollectiveKind::all_reduce, "grads", 1024, ElementType::i32, -1,
                            ReduceOp::sum)
                .hash,
            base);
  EXPECT_NE(Signature::make(17, CollectiveKind::all_reduce, "grads", 1024, ElementType::f32, -1,
                            ReduceOp::max)
                .hash,
            base);
  EXPECT_NE(Signature::make(17, CollectiveKind::all_reduce, "grad", 1024, ElementType::f32, -1,
                            ReduceOp::sum)
                .hash,
            base);
  EXPECT_NE(Signature::make(17, CollectiveKind::broadcast, "p", 1, ElementType::f32, 0,
                            ReduceOp::sum)
                .hash,
            Signature::make(17, CollectiveKind::broadcast, "p", 1, ElementType::f32, 1,
                            ReduceOp::sum)
                .hash);
}

TEST(CommSignature, LongNamesAreTruncatedButFullyHashed) {
  const std::string a(60, 'a');
  std::string b = a;
  b.back() = 'b';
  const auto sa = Signature::make(1, CollectiveKind::barrier, a, 0, ElementType::u8, -1,
                                  ReduceOp::sum);
  const auto sb = Signature::make(1, CollectiveKind::barrier, b, 0, ElementType::u8, -1,
                                  ReduceOp::sum);
  EXPECT_EQ(sa.name_view(), std::string(Signature::kNameBytes, 'a'));
  EXPECT_NE(sa.hash, sb.hash);
}

TEST(CommSignature, AgreementIsNoMismatch) {
  const std::vector<Signature> same(4, all_reduce_grads());
  EXPECT_EQ(find_mismatch(same), "");
  EXPECT_EQ(find_mismatch(std::vector<Signature>{}), "");
}

TEST(CommSignature, MismatchGroupsRanks) {
  EXPECT_EQ(find_mismatch(std::vector<Signature>{all_reduce_grads(), broadcast_params()}),
            "collective mismatch at #17: rank 0 all_reduce(grads, 1024 x f32, sum) vs rank 1 "
            "broadcast(params, 1024 x f32, root 0)");
  EXPECT_EQ(find_mismatch(std::vector<Signature>{all_reduce_grads(), broadcast_params(),
                                                 all_reduce_grads(), all_reduce_grads(17, 7)}),
            "collective mismatch at #17: ranks 0, 2 all_reduce(grads, 1024 x f32, sum) vs rank 1 "
            "broadcast(params, 1024 x f32, root 0) vs rank 3 all_reduce(grads, 7 x f32, sum)");
}

TEST(CommSignature, MismatchSaysWhenARankIsAtAnotherCollective) {
  EXPECT_EQ(find_mismatch(std::vector<Signature>{all_reduce_grads(17), all_reduce_grads(18)}),
            "collective mismatch at #17: rank 0 all_reduce(grads, 1024 x f32, sum) vs rank 1 at "
            "#18 all_reduce(grads, 1024 x f32, sum)");
}

}  // namespace
}  // namespace flotilla::comm
