// The parameter layout says where each weight is with a typed reference: a float tensor of
// the flat buffer, a quantized matrix, or absent; nothing encodes one in another's value.
#include "flotilla/model/params.hpp"

#include <gtest/gtest.h>

#include <set>
#include <string>

#include "flotilla/base/error.hpp"

namespace flotilla::model {
namespace {

ModelConfig two_layer_config(bool qkv_bias) {
  ModelConfig c;
  c.arch = qkv_bias ? Architecture::qwen2 : Architecture::llama;
  c.qkv_bias = qkv_bias;
  c.vocab_size = 64;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_dim = 64;
  return c;
}

TEST(WeightRef, BiasesAreAbsentUnlessTheConfigHasThem) {
  const ParamLayout plain(two_layer_config(false));
  EXPECT_FALSE(plain.layers[0].q_bias.present());
  EXPECT_EQ(plain.layers[0].q_bias.kind(), WeightRef::Kind::absent);
  const ParamLayout qwen(two_layer_config(true));
  ASSERT_TRUE(qwen.layers[1].v_bias.is_dense());
  EXPECT_EQ(qwen.layers[1].v_bias.offset(), qwen.find("model.layers.1.self_attn.v_proj.bias")->offset);
}

TEST(WeightRef, FloatWeightsReferToTheirOffsetInTheFlatBuffer) {
  const ParamLayout layout(two_layer_config(false));
  const LayerParams& l1 = layout.layers[1];
  EXPECT_EQ(l1.down_proj, layout.find("model.layers.1.mlp.down_proj.weight")->ref());
  EXPECT_EQ(l1.down_proj.offset(), layout.find("model.layers.1.mlp.down_proj.weight")->offset);
  EXPECT_EQ(layout.final_norm.offset(), layout.find("model.norm.weight")->offset);
  // The first tensor sits at offset 0: a dense reference there is not "absent".
  EXPECT_TRUE(layout.embed.is_dense());
  EXPECT_EQ(layout.embed.offset(), 0);
}

TEST(WeightRef, QuantizedWeightsReferToTheirSlotInLayoutOrder) {
  const std::set<std::string> quantized = {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                                           "lm_head.weight"};
  const ParamLayout layout(two_layer_config(false), quantized);
  ASSERT_TRUE(layout.embed.is_quantized());
  EXPECT_EQ(layout.embed.slot(), 0);
  EXPECT_EQ(layout.layers[1].k_proj.slot(), 1);
  EXPECT_EQ(layout.lm_head.slot(), 2);
  EXPECT_TRUE(layout.layers[1].q_proj.is_dense());
  EXPECT_EQ(layout.num_quantized(), 3);
  // A quantized tensor takes no room in the flat buffer.
  const ParamInfo* k = layout.find("model.layers.1.self_attn.k_proj.weight");
  EXPECT_EQ(k->numel, 0);
  EXPECT_EQ(k->ref(), layout.layers[1].k_proj);
}

TEST(WeightRef, ReadingTheWrongKindIsAnError) {
  const ParamLayout layout(two_layer_config(false), {"model.layers.0.mlp.up_proj.weight"});
  EXPECT_THROW((void)layout.layers[0].up_proj.offset(), Error);
  EXPECT_THROW((void)layout.layers[0].gate_proj.slot(), Error);
  EXPECT_THROW((void)layout.layers[0].q_bias.offset(), Error);
}

}  // namespace
}  // namespace flotilla::model
