// TraceRecorder writes a Chrome trace that a JSON parser (and Perfetto) reads: lane names,
// complete events with start and duration in microseconds.
#include "flotilla/base/trace.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

namespace flotilla {
namespace {

TEST(Trace, SpansFromTwoThreadsBecomeCompleteEventsOnTheirLanes) {
  TraceRecorder trace;
  {
    TraceSpan compute(&trace, "backward \"layer 3\"", TraceLane::compute);
    std::thread comm([&] { TraceSpan s(&trace, "all-reduce bucket 0", TraceLane::communication, R"({"bytes":64})"); });
    comm.join();
  }
  TraceSpan nothing(nullptr, "not recorded", TraceLane::compute);
  ASSERT_EQ(trace.size(), 2u);
  const auto path = std::filesystem::temp_directory_path() / "flotilla_trace_test.json";
  trace.write(path, 3);
  std::ifstream in(path);
  const nlohmann::json events = nlohmann::json::parse(in);
  std::filesystem::remove(path);
  int complete = 0;
  for (const auto& e : events) {
    EXPECT_EQ(e.at("pid"), 3);
    if (e.at("ph") != "X") continue;
    ++complete;
    EXPECT_GE(e.at("dur").get<int64_t>(), 0);
    if (e.at("name") == "all-reduce bucket 0") {
      EXPECT_EQ(e.at("tid"), 2);
      EXPECT_EQ(e.at("args").at("bytes"), 64);
    } else {
      EXPECT_EQ(e.at("name"), "backward \"layer 3\"");
      EXPECT_EQ(e.at("tid"), 1);
    }
  }
  EXPECT_EQ(complete, 2);
}

}  // namespace
}  // namespace flotilla
