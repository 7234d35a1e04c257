// The link model: bandwidth and latency flags, and the ring collectives' closed forms.
#include "flotilla/plan/link.hpp"

#include <gtest/gtest.h>

#include <string>

#include "flotilla/base/error.hpp"

namespace flotilla::plan {
namespace {

TEST(ParseBandwidth, ReadsBitAndByteUnits) {
  EXPECT_DOUBLE_EQ(parse_bandwidth("1gbit"), 125e6);
  EXPECT_DOUBLE_EQ(parse_bandwidth("10gbit"), 1.25e9);
  EXPECT_DOUBLE_EQ(parse_bandwidth("100mbit"), 12.5e6);
  EXPECT_DOUBLE_EQ(parse_bandwidth("25Gbit/s"), 25e9 / 8);
  EXPECT_DOUBLE_EQ(parse_bandwidth("1.25GB/s"), 1.25e9);
  EXPECT_DOUBLE_EQ(parse_bandwidth("125MB/s"), 125e6);
  EXPECT_DOUBLE_EQ(parse_bandwidth("800KB/s"), 800e3);
  EXPECT_DOUBLE_EQ(parse_bandwidth(" 1 gbps "), 125e6);
  EXPECT_DOUBLE_EQ(parse_bandwidth("1e9"), 1e9);  // a bare number is bytes per second
}

TEST(ParseBandwidth, RejectsNonsenseNamingTheFlag) {
  for (const std::string bad : {"", "fast", "gbit", "-1gbit", "0gbit", "1furlong", "1 g bit x", "nan"}) {
    try {
      parse_bandwidth(bad, "--bandwidth");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("--bandwidth"), std::string::npos) << e.what();
    }
  }
}

TEST(ParseLatency, ReadsTimeUnits) {
  EXPECT_DOUBLE_EQ(parse_latency("50us"), 50e-6);
  EXPECT_DOUBLE_EQ(parse_latency("0.2ms"), 0.2e-3);
  EXPECT_DOUBLE_EQ(parse_latency("1s"), 1.0);
  EXPECT_DOUBLE_EQ(parse_latency("500ns"), 500e-9);
  EXPECT_DOUBLE_EQ(parse_latency("0"), 0.0);
  EXPECT_THROW(parse_latency("soon"), InputError);
  EXPECT_THROW(parse_latency("-1us"), InputError);
  EXPECT_THROW(parse_latency("3 parsecs"), InputError);
}

TEST(Ring, OneRankCostsNothing) {
  const Link link{1e9, 1e-5, ""};
  EXPECT_EQ(ring_all_reduce_s(1e9, 1, link), 0.0);
  EXPECT_EQ(ring_all_reduce_wire_bytes(1e9, 1), 0.0);
  EXPECT_EQ(ring_all_gather_s(1e9, 1, link), 0.0);
}

TEST(Ring, AllReduceIsTwoNMinusOneOverNPayloadPlusLatencies) {
  const Link link{1e9, 1e-5, ""};
  // 4 ranks, 1 MB: 2*3/4 * 1e6 / 1e9 + 2*3 * 1e-5 = 1.5 ms + 60 us.
  EXPECT_NEAR(ring_all_reduce_s(1e6, 4, link), 1.5e-3 + 6e-5, 1e-12);
  EXPECT_DOUBLE_EQ(ring_all_reduce_wire_bytes(1e6, 4), 1.5e6);
  // Reduce-scatter and all-gather are each half of it.
  EXPECT_NEAR(ring_reduce_scatter_s(1e6, 4, link) + ring_all_gather_s(1e6, 4, link), ring_all_reduce_s(1e6, 4, link),
              1e-12);
  // However many ranks, a rank sends under twice the payload; latency grows linearly.
  EXPECT_LT(ring_all_reduce_wire_bytes(1e6, 1000), 2e6);
  EXPECT_GT(ring_all_reduce_wire_bytes(1e6, 1000), 1.99e6);
  EXPECT_NEAR(ring_all_reduce_s(0, 1000, link), 2 * 999 * 1e-5, 1e-12);
}

TEST(Format, SaysUnits) {
  EXPECT_EQ(format_bandwidth(125e6), "1 Gbit/s (125 MB/s)");
  EXPECT_EQ(format_seconds(0.0032), "3.20 ms");
  EXPECT_EQ(format_seconds(45e-6), "45.0 us");
  EXPECT_EQ(format_seconds(9000), "2.5 h");
  EXPECT_EQ(format_bytes(1536), "1.5 KiB");
}

}  // namespace
}  // namespace flotilla::plan
