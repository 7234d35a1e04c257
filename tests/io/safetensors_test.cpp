#include "flotilla/io/safetensors.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "io_test_util.hpp"

namespace flotilla::io {
namespace {
using ::testing::HasSubstr;
using test_util::fresh_seed;
using test_util::random_floats;
using test_util::TempDir;
using test_util::write_bytes;
using test_util::write_raw_safetensors;

// Message of the InputError that opening `path` raises ("" if none is raised).
std::string open_error(const std::filesystem::path& path) {
  try {
    SafetensorsFile f(path);
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "opening " << path << " raised no InputError";
  return "";
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
  write_raw_safetensors(tmp / "dtype.safetensors",
                        R"({"w":{"dtype":"Q7","shape":[2],"data_offsets":[0,2]}})", "ab");
  const std::string msg = open_error(tmp / "dtype.safetensors");
  EXPECT_THAT(msg, HasSubstr("dtype.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'w': unsupported dtype 'Q7' (supported: F32, F16, BF16"));
}

TEST(SafetensorsRead, MissingDtypeIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "m.safetensors", R"({"w":{"shape":[1],"data_offsets":[0,4]}})",
                        "abcd");
  EXPECT_THAT(open_error(tmp / "m.safetensors"), HasSubstr("tensor 'w': missing string field 'dtype'"));
}

TEST(SafetensorsRead, NegativeOrFractionalShapeIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "neg.safetensors",
                        R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "abcd");
  EXPECT_THAT(open_error(tmp / "neg.safetensors"),
              HasSubstr("tensor 'w': shape [-1] has an entry that is not a non-negative integer"));
  write_raw_safetensors(tmp / "frac.safetensors",
                        R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "abcd");
  EXPECT_THAT(open_error(tmp / "frac.safetensors"), HasSubstr("not a non-negative integer"));
}

TEST(SafetensorsRead, ShapeWhoseElementCountOverflowsIsRejected) {
  TempDir tmp;
  write_raw_safetensors(
      tmp / "m.safetensors",
      R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", "abcd");
  EXPECT_THAT(open_error(tmp / "m.safetensors"), HasSubstr("too many elements"));
}

TEST(SafetensorsRead, MalformedDataOffsetsAreRejected) {
  TempDir tmp;
  for (const char* offsets : {R"([0])", R"([0,4,8])", R"("0,4")", R"([-4,0])", R"([0,"4"])"}) {
    SCOPED_TRACE(offsets);
    write_raw_safetensors(
        tmp / "m.safetensors",
        std::string(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":)") + offsets + "}}",
        "abcd");
    const std::string msg = open_error(tmp / "m.safetensors");
    EXPECT_THAT(msg, HasSubstr("m.safetensors"));
    EXPECT_THAT(msg, HasSubstr("tensor 'w': 'data_offsets' must be [begin, end]"));
  }
}

TEST(SafetensorsRead, DataOffsetsWithBeginAfterEndAreRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "m.safetensors",
                        R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "abcdefgh");
  EXPECT_THAT(open_error(tmp / "m.safetensors"),
              HasSubstr("tensor 'w': data_offsets [4, 0] has begin > end"));
}

TEST(SafetensorsRead, DataOffsetsPastTheEndOfTheFileAreRejected) {
  TempDir tmp;
  // A file cut short: the header promises 8 bytes of data, 4 are there.
  write_raw_safetensors(tmp / "cut.safetensors",
                        R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "abcd");
  const std::string msg = open_error(tmp / "cut.safetensors");
  EXPECT_THAT(msg, HasSubstr("cut.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'w': data_offsets [0, 8] out of range: the data section has 4 bytes"));
}

TEST(SafetensorsRead, ByteLengthThatDoesNotMatchTheShapeIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "m.safetensors",
                        R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})", "abcdefgh");
  EXPECT_THAT(open_error(tmp / "m.safetensors"),
              HasSubstr("tensor 'w': data_offsets [0, 8] hold 8 bytes, but shape [2, 3] of BF16 "
                        "needs 12"));
}

TEST(SafetensorsRead, NonStringMetadataIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "m.safetensors", R"({"__metadata__":{"step":12}})", "");
  EXPECT_THAT(open_error(tmp / "m.safetensors"),
              HasSubstr("__metadata__ value for 'step' is not a string"));
}

TEST(SafetensorsRead, DuplicateTensorNamesAreRejected) {
  TempDir tmp;
  // JSON parsers keep one of the two silently; which one differs between readers.
  write_raw_safetensors(tmp / "dup.safetensors",
                        R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                        "abcdefgh");
  const std::string msg = open_error(tmp / "dup.safetensors");
  EXPECT_THAT(msg, HasSubstr("dup.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'w' appears twice in the header"));
}

TEST(SafetensorsRead, DuplicateFieldInATensorEntryIsRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "dup.safetensors",
                        R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"F16"}})", "abcd");
  EXPECT_THAT(open_error(tmp / "dup.safetensors"), HasSubstr("tensor 'w': key 'dtype' appears twice"));
}

TEST(SafetensorsRead, OverlappingTensorsAreRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "m.safetensors",
                        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                        "abcdefgh");
  EXPECT_THAT(open_error(tmp / "m.safetensors"),
              HasSubstr("tensor 'b': data_offsets [4, 8] overlap tensor 'a', which ends at 8"));
  // The same tensor twice under two names is an overlap too.
  write_raw_safetensors(tmp / "alias.safetensors",
                        R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                        "abcd");
  EXPECT_THAT(open_error(tmp / "alias.safetensors"), HasSubstr("overlap tensor"));
}

TEST(SafetensorsRead, GapsAndTrailingBytesInTheDataSectionAreRejected) {
  TempDir tmp;
  write_raw_safetensors(tmp / "gap.safetensors",
                        R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                        "abcdefghijkl");
  EXPECT_THAT(open_error(tmp / "gap.safetensors"),
              HasSubstr("bytes [4, 8) of the data section belong to no tensor"));
  write_raw_safetensors(tmp / "tail.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                        "abcdefg");
  EXPECT_THAT(open_error(tmp / "tail.safetensors"), HasSubstr("3 trailing bytes after the last tensor"));
  write_raw_safetensors(tmp / "empty_tail.safetensors", R"({"__metadata__":{}})", "x");
  EXPECT_THAT(open_error(tmp / "empty_tail.safetensors"), HasSubstr("1 trailing bytes"));
}

TEST(SafetensorsRead, TiledTensorsEmptyTensorsAndMetadataOnlyFilesAreAccepted) {
  TempDir tmp;
  // Header order need not be offset order; empty tensors take no bytes anywhere.
  write_raw_safetensors(tmp / "m.safetensors",
                        R"({"__metadata__":{"format":"pt"},)"
                        R"("b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]},)"
                        R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[8,8]},)"
                        R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
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
