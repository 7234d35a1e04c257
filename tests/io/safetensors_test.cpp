#include "flotilla/io/safetensors.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "io_test_util.hpp"
#include "../test_errors.hpp"

namespace flotilla::io {
namespace {
using ::testing::HasSubstr;
using ::flotilla::testing::input_error_of;
using test_util::fresh_seed;
using test_util::random_floats;
using test_util::TempDir;
using test_util::write_bytes;
using test_util::write_raw_safetensors;

// Message of the InputError that opening `path` raises ("" and a failure if none is raised).
std::string open_error(const std::filesystem::path& path) {
  return input_error_of([&] { SafetensorsFile f(path); });
}

// One tensor's entry in a header: "name":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}.
std::string tensor_entry(const std::string& name, const std::string& dtype, const std::string& shape, int64_t begin,
                         int64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// A header of these entries, in this order: {entry,entry,...}.
std::string header_of(std::initializer_list<std::string> entries) {
  std::string header;
  for (const std::string& e : entries) header += (header.empty() ? "{" : ",") + e;
  return header.empty() ? "{}" : header + "}";
}

// Writes tmp/file (this header, then this data section) and returns the message of the
// InputError that opening it raises.
std::string layout_error(const TempDir& tmp, const std::string& file, const std::string& header,
                         const std::string& data) {
  write_raw_safetensors(tmp / file, header, data);
  return open_error(tmp / file);
}

float round_to(DType dt, float x) {
  if (dt == DType::bf16) return bf16_to_f32(f32_to_bf16(x));
  if (dt == DType::f16) return f16_to_f32(f32_to_f16(x));
  return x;
}

// ------------------------------------------------------------------------ round trips

class RoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTrip, ValuesComeBackWithinTheDtypesRounding) {
  const DType dt = GetParam();
  const uint32_t seed = fresh_seed();
  TempDir tmp;
  const auto a = random_floats(3 * 5, seed);
  const auto b = random_floats(7, seed + 1);
  const std::vector<TensorToWrite> tensors{{"a.weight", {3, 5}, a.data()},
                                           {"b.bias", {7}, b.data()}};
  write_safetensors(tmp / "m.safetensors", tensors, dt);

  const SafetensorsFile f(tmp / "m.safetensors");
  ASSERT_EQ(f.tensors().size(), 2u);
  for (size_t k = 0; k < tensors.size(); ++k) {
    const TensorEntry& t = f.at(tensors[k].name);
    EXPECT_EQ(t.dtype, dt);
    EXPECT_EQ(t.shape, tensors[k].shape);
    EXPECT_EQ(t.file, tmp / "m.safetensors");
    std::vector<float> got(static_cast<size_t>(t.numel()));
    convert_to_f32(t.dtype, t.bytes.data(), got);
    // Relative error bound of round-to-nearest: 2^-24 (f32: exact), 2^-11 (f16), 2^-8 (bf16).
    const float rel = dt == DType::f32 ? 0.0f : dt == DType::f16 ? 0x1p-11f : 0x1p-8f;
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = tensors[k].data[i];
      EXPECT_NEAR(got[i], want, rel * std::fabs(want)) << tensors[k].name << "[" << i << "]";
      EXPECT_EQ(got[i], round_to(dt, want));  // and it is exactly the nearest value
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RoundTrip, ::testing::Values(DType::f32, DType::f16, DType::bf16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(SafetensorsWrite, HeaderIsPaddedToEightBytesAndKeepsTensorOrder) {
  TempDir tmp;
  const std::vector<float> x(3, 1.0f), y(1, 2.0f), z(2, 3.0f);
  // Names deliberately out of alphabetical order: the file keeps the given order.
  const std::vector<TensorToWrite> tensors{
      {"zeta", {3}, x.data()}, {"alpha", {1}, y.data()}, {"mid", {2}, z.data()}};
  write_safetensors(tmp / "m.safetensors", tensors, DType::f32);

  const MappedFile raw(tmp / "m.safetensors");
  uint64_t n = 0;
  std::memcpy(&n, raw.bytes().data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(static_cast<char>(raw.bytes()[8]), '{');
  EXPECT_EQ(raw.size(), 8 + n + 6 * 4);  // contiguous data, no gaps

  const SafetensorsFile f(tmp / "m.safetensors");
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "zeta");
  EXPECT_EQ(f.tensors()[1].name, "alpha");
  EXPECT_EQ(f.tensors()[2].name, "mid");
  EXPECT_LT(f.tensors()[0].bytes.data(), f.tensors()[1].bytes.data());
  EXPECT_LT(f.tensors()[1].bytes.data(), f.tensors()[2].bytes.data());
}

TEST(SafetensorsWrite, MetadataDefaultsToFormatPtAndKeepsCallerEntries) {
  TempDir tmp;
  const float v = 1.0f;
  const std::vector<TensorToWrite> tensors{{"w", {1}, &v}};
  write_safetensors(tmp / "a.safetensors", tensors, DType::f32);
  EXPECT_EQ(SafetensorsFile(tmp / "a.safetensors").metadata(),
            (SafetensorsMetadata{{"format", "pt"}}));

  write_safetensors(tmp / "b.safetensors", tensors, DType::f32, {{"step", "12"}});
  EXPECT_EQ(SafetensorsFile(tmp / "b.safetensors").metadata(),
            (SafetensorsMetadata{{"format", "pt"}, {"step", "12"}}));
}

TEST(SafetensorsWrite, ScalarsAndEmptyTensorsRoundTrip) {
  TempDir tmp;
  const float s = 4.5f;
  const std::vector<TensorToWrite> tensors{{"scalar", {}, &s}, {"empty", {0, 3}, nullptr}};
  write_safetensors(tmp / "m.safetensors", tensors, DType::bf16);
  const SafetensorsFile f(tmp / "m.safetensors");
  EXPECT_TRUE(f.at("scalar").shape.empty());
  EXPECT_EQ(f.at("scalar").numel(), 1);
  float got = 0.0f;
  convert_to_f32(DType::bf16, f.at("scalar").bytes.data(), std::span<float>(&got, 1));
  EXPECT_EQ(got, 4.5f);
  EXPECT_EQ(f.at("empty").shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(f.at("empty").bytes.size(), 0u);
}

TEST(SafetensorsWrite, LargeTensorIsConvertedAcrossSeveralChunks) {
  // More elements than one conversion chunk (2^20) to cover the chunk boundary.
  TempDir tmp;
  const uint32_t seed = fresh_seed();
  const auto big = random_floats((size_t{1} << 20) + 37, seed);
  const std::vector<TensorToWrite> tensors{
      {"big", {static_cast<int64_t>(big.size())}, big.data()}};
  write_safetensors(tmp / "m.safetensors", tensors, DType::f16);
  const SafetensorsFile f(tmp / "m.safetensors");
  std::vector<float> got(big.size());
  convert_to_f32(DType::f16, f.at("big").bytes.data(), got);
  for (size_t i : {size_t{0}, (size_t{1} << 20) - 1, size_t{1} << 20, big.size() - 1})
    EXPECT_EQ(got[i], round_to(DType::f16, big[i])) << i;
}

TEST(SafetensorsWrite, RejectedTensorListLeavesExistingFileUntouched) {
  TempDir tmp;
  const float v = 1.0f;
  const std::vector<TensorToWrite> good{{"w", {1}, &v}};
  write_safetensors(tmp / "m.safetensors", good, DType::f32);
  const std::string before = read_text_file(tmp / "m.safetensors");

  const std::vector<TensorToWrite> twice{{"w", {1}, &v}, {"w", {1}, &v}};
  EXPECT_THROW(write_safetensors(tmp / "m.safetensors", twice, DType::f32), Error);
  EXPECT_THROW(write_safetensors(tmp / "m.safetensors", good, DType::i32), Error);
  EXPECT_EQ(read_text_file(tmp / "m.safetensors"), before);
  // No temporary file is left behind.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(tmp.path()),
                          std::filesystem::directory_iterator()),
            1);
}

// Python (no safetensors package: json + struct) parses our file to the same values, and
// finds the layout the Rust safetensors library insists on: data offsets contiguous from
// 0 and covering the whole data section.
TEST(SafetensorsWrite, PythonReadsWhatWeWrite) {
  if (!std::filesystem::exists("/usr/bin/python3")) GTEST_SKIP() << "no /usr/bin/python3";
  TempDir tmp;
  const uint32_t seed = fresh_seed();
  const auto a = random_floats(6, seed);
  const auto b = random_floats(4, seed + 1);
  const auto c = random_floats(5, seed + 2);
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    const std::vector<TensorToWrite> tensors{
        {"model.a", {2, 3}, a.data()}, {"model.b", {4}, b.data()}, {"lm_head", {5, 1}, c.data()}};
    write_safetensors(tmp / "m.safetensors", tensors, dt);
    write_bytes(tmp / "read.py", R"PY(
import json, struct, sys
b = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
assert (8 + n) % 8 == 0, 'header not padded'
h = json.loads(b[8:8 + n].decode('utf-8'))
data = b[8 + n:]
spans = sorted(tuple(v['data_offsets']) for k, v in h.items() if k != '__metadata__')
pos = 0
for s, e in spans:
    assert s == pos, 'gap or overlap at %d' % s
    pos = e
assert pos == len(data), 'data section not fully covered'
out = {'__metadata__': h['__metadata__']}
for k, v in h.items():
    if k == '__metadata__':
        continue
    s, e = v['data_offsets']
    raw = data[s:e]
    if v['dtype'] == 'F32':
        vals = struct.unpack('<%df' % (len(raw) // 4), raw)
    elif v['dtype'] == 'F16':
        vals = struct.unpack('<%de' % (len(raw) // 2), raw)
    else:
        vals = [struct.unpack('<f', b'\0\0' + raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
    out[k] = {'dtype': v['dtype'], 'shape': v['shape'], 'values': list(vals)}
print(json.dumps(out))
)PY");
    const std::string cmd = "/usr/bin/python3 " + (tmp / "read.py").string() + " " +
                            (tmp / "m.safetensors").string() + " > " +
                            (tmp / "out.json").string();
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    const auto out = nlohmann::json::parse(read_text_file(tmp / "out.json"));
    EXPECT_EQ(out["__metadata__"]["format"], "pt");
    for (const auto& t : tensors) {
      const auto& got = out.at(t.name);
      EXPECT_EQ(got["dtype"], std::string(dtype_name(dt)));
      EXPECT_EQ(got["shape"].get<std::vector<int64_t>>(), t.shape);
      const auto values = got["values"].get<std::vector<double>>();
      int64_t numel = 1;
      for (int64_t d : t.shape) numel *= d;
      ASSERT_EQ(values.size(), static_cast<size_t>(numel));
      for (size_t i = 0; i < values.size(); ++i)
        EXPECT_EQ(static_cast<float>(values[i]), round_to(dt, t.data[i])) << t.name << "[" << i << "]";
    }
  }
}

// ----------------------------------------------------------------------- bad input

TEST(SafetensorsRead, MissingFileIsAnInputErrorNamingIt) {
  TempDir tmp;
  EXPECT_THAT(open_error(tmp / "absent.safetensors"), HasSubstr("absent.safetensors"));
}

TEST(SafetensorsRead, FileShorterThanTheLengthFieldIsRejected) {
  TempDir tmp;
  write_bytes(tmp / "short.safetensors", "abc");
  const std::string msg = open_error(tmp / "short.safetensors");
  EXPECT_THAT(msg, HasSubstr("[io/safetensors]"));
  EXPECT_THAT(msg, HasSubstr("short.safetensors"));
  EXPECT_THAT(msg, HasSubstr("too short for the 8-byte header length"));
}

TEST(SafetensorsRead, AbsurdHeaderLengthIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "huge.safetensors", "{}", "", uint64_t{1} << 40);
  const std::string msg = open_error(tmp / "huge.safetensors");
  EXPECT_THAT(msg, HasSubstr("huge.safetensors"));
  EXPECT_THAT(msg, HasSubstr("header length 1099511627776 is absurd"));
}

TEST(SafetensorsRead, TruncatedHeaderIsRejected) {
  TempDir tmp;
  // Declares 200 bytes of header, holds 30.
  write_raw_safetensors(tmp / "trunc.safetensors", R"({"w":{"dtype":"F32","shape":[1],)", "",
                        200);
  const std::string msg = open_error(tmp / "trunc.safetensors");
  EXPECT_THAT(msg, HasSubstr("trunc.safetensors"));
  EXPECT_THAT(msg, HasSubstr("header length 200 exceeds the file size"));
}

TEST(SafetensorsRead, NonJsonHeaderIsRejectedWithThePosition) {
  TempDir tmp;
  write_raw_safetensors(tmp / "garbage.safetensors", "{not json at all}", "");
  const std::string msg = open_error(tmp / "garbage.safetensors");
  EXPECT_THAT(msg, HasSubstr("garbage.safetensors"));
  EXPECT_THAT(msg, HasSubstr("header is not valid JSON (byte 3): parse error at line 1, column 3"));
}

TEST(SafetensorsRead, HeaderThatIsNotAnObjectIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "array.safetensors", "[1, 2, 3]", "");
  EXPECT_THAT(open_error(tmp / "array.safetensors"), HasSubstr("header is not a JSON object"));
}

TEST(SafetensorsRead, DeeplyNestedHeaderIsRejectedWithoutRecursing) {
  TempDir tmp;
  write_raw_safetensors(tmp / "deep.safetensors",
                        std::string(100000, '[') + std::string(100000, ']'), "");
  EXPECT_THAT(open_error(tmp / "deep.safetensors"), HasSubstr("nests deeper"));
}

TEST(SafetensorsRead, UnknownDtypeIsRejectedNamingTheTensor) {
  TempDir tmp;
  const std::string msg =
      layout_error(tmp, "dtype.safetensors", header_of({tensor_entry("w", "Q7", "[2]", 0, 2)}), "ab");
  EXPECT_THAT(msg, HasSubstr("dtype.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'w': unsupported dtype 'Q7' (supported: F32, F16, BF16"));
}

TEST(SafetensorsRead, MissingDtypeIsRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "m.safetensors", R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "abcd"),
              HasSubstr("tensor 'w': missing string field 'dtype'"));
}

TEST(SafetensorsRead, NegativeOrFractionalShapeIsRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "neg.safetensors", header_of({tensor_entry("w", "F32", "[-1]", 0, 4)}), "abcd"),
              HasSubstr("tensor 'w': shape [-1] has an entry that is not a non-negative integer"));
  EXPECT_THAT(layout_error(tmp, "frac.safetensors", header_of({tensor_entry("w", "F32", "[1.5]", 0, 4)}), "abcd"),
              HasSubstr("not a non-negative integer"));
}

TEST(SafetensorsRead, ShapeWhoseElementCountOverflowsIsRejected) {
  TempDir tmp;
  const std::string header = header_of({tensor_entry("w", "F32", "[4294967296,4294967296]", 0, 4)});
  EXPECT_THAT(layout_error(tmp, "m.safetensors", header, "abcd"), HasSubstr("too many elements"));
}

TEST(SafetensorsRead, MalformedDataOffsetsAreRejected) {
  TempDir tmp;
  for (const char* offsets : {R"([0])", R"([0,4,8])", R"("0,4")", R"([-4,0])", R"([0,"4"])"}) {
    SCOPED_TRACE(offsets);
    const std::string msg = layout_error(
        tmp, "m.safetensors", std::string(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":)") + offsets + "}}",
        "abcd");
    EXPECT_THAT(msg, HasSubstr("m.safetensors"));
    EXPECT_THAT(msg, HasSubstr("tensor 'w': 'data_offsets' must be [begin, end]"));
  }
}

TEST(SafetensorsRead, DataOffsetsWithBeginAfterEndAreRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "m.safetensors", header_of({tensor_entry("w", "F32", "[1]", 4, 0)}), "abcdefgh"),
              HasSubstr("tensor 'w': data_offsets [4, 0] has begin > end"));
}

TEST(SafetensorsRead, DataOffsetsPastTheEndOfTheFileAreRejected) {
  TempDir tmp;
  // A file cut short: the header promises 8 bytes of data, 4 are there.
  const std::string msg =
      layout_error(tmp, "cut.safetensors", header_of({tensor_entry("w", "F32", "[2]", 0, 8)}), "abcd");
  EXPECT_THAT(msg, HasSubstr("cut.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'w': data_offsets [0, 8] out of range: the data section has 4 bytes"));
}

TEST(SafetensorsRead, ByteLengthThatDoesNotMatchTheShapeIsRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "m.safetensors", header_of({tensor_entry("w", "BF16", "[2,3]", 0, 8)}), "abcdefgh"),
              HasSubstr("tensor 'w': data_offsets [0, 8] hold 8 bytes, but shape [2, 3] of BF16 needs 12"));
}

TEST(SafetensorsRead, NonStringMetadataIsRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "m.safetensors", R"({"__metadata__":{"step":12}})", ""),
              HasSubstr("__metadata__ value for 'step' is not a string"));
}

TEST(SafetensorsRead, DuplicateTensorNamesAreRejected) {
  TempDir tmp;
  // JSON parsers keep one of the two silently; which one differs between readers.
  const std::string msg = layout_error(
      tmp, "dup.safetensors",
      header_of({tensor_entry("w", "F32", "[1]", 0, 4), tensor_entry("w", "F32", "[1]", 4, 8)}), "abcdefgh");
  EXPECT_THAT(msg, HasSubstr("dup.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'w' appears twice in the header"));
}

TEST(SafetensorsRead, DuplicateFieldInATensorEntryIsRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "dup.safetensors",
                           R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"F16"}})", "abcd"),
              HasSubstr("tensor 'w': key 'dtype' appears twice"));
}

TEST(SafetensorsRead, OverlappingTensorsAreRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "m.safetensors",
                           header_of({tensor_entry("a", "F32", "[2]", 0, 8), tensor_entry("b", "U8", "[4]", 4, 8)}),
                           "abcdefgh"),
              HasSubstr("tensor 'b': data_offsets [4, 8] overlap tensor 'a', which ends at 8"));
  // The same tensor twice under two names is an overlap too.
  EXPECT_THAT(layout_error(tmp, "alias.safetensors",
                           header_of({tensor_entry("a", "F32", "[1]", 0, 4), tensor_entry("b", "F32", "[1]", 0, 4)}),
                           "abcd"),
              HasSubstr("overlap tensor"));
}

TEST(SafetensorsRead, GapsAndTrailingBytesInTheDataSectionAreRejected) {
  TempDir tmp;
  EXPECT_THAT(layout_error(tmp, "gap.safetensors",
                           header_of({tensor_entry("a", "F32", "[1]", 0, 4), tensor_entry("b", "F32", "[1]", 8, 12)}),
                           "abcdefghijkl"),
              HasSubstr("bytes [4, 8) of the data section belong to no tensor"));
  EXPECT_THAT(layout_error(tmp, "tail.safetensors", header_of({tensor_entry("a", "F32", "[1]", 0, 4)}), "abcdefg"),
              HasSubstr("3 trailing bytes after the last tensor"));
  EXPECT_THAT(layout_error(tmp, "empty_tail.safetensors", R"({"__metadata__":{}})", "x"),
              HasSubstr("1 trailing bytes"));
}

TEST(SafetensorsRead, TiledTensorsEmptyTensorsAndMetadataOnlyFilesAreAccepted) {
  TempDir tmp;
  // Header order need not be offset order; empty tensors take no bytes anywhere.
  write_raw_safetensors(tmp / "m.safetensors",
                        header_of({R"("__metadata__":{"format":"pt"})", tensor_entry("b", "U8", "[4]", 8, 12),
                                   tensor_entry("e", "F32", "[0,3]", 8, 8), tensor_entry("a", "F32", "[2]", 0, 8)}),
                        "abcdefghijkl");
  const SafetensorsFile f(tmp / "m.safetensors");
  EXPECT_EQ(f.at("b").bytes.data(), f.at("a").bytes.data() + 8);
  EXPECT_EQ(f.at("b").dtype, DType::u8);
  EXPECT_EQ(f.at("e").numel(), 0);
  EXPECT_EQ(f.find("c"), nullptr);
  try {
    (void)f.at("c");
    ADD_FAILURE() << "no error for a missing tensor";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr("m.safetensors: no tensor 'c'"));
  }

  write_raw_safetensors(tmp / "empty.safetensors", R"({"__metadata__":{}})", "");
  EXPECT_TRUE(SafetensorsFile(tmp / "empty.safetensors").tensors().empty());
}

}  // namespace
}  // namespace flotilla::io
