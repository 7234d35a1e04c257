"""Bad-input cases for quantized models (MLX layout) and `flotilla convert`, registered into
bad_input_test.py's case list (kept apart so that file stays readable).

A quantizable tiny model (every input dimension divides into groups of 32) and its 4-bit
conversion are made once per run.
"""

import json
import subprocess
from pathlib import Path

QUANT_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def register_quant_cases(case, Run, ws_helpers):
    score, generate, train, edit_json, edit_safetensors = ws_helpers

    def float_model(ws) -> Path:
        """A fresh copy of the quantizable float model in this case's directory."""
        src = ws.root / "valid_quantizable"
        if not src.exists():
            cfg = ws.root / "quantizable_config.json"
            cfg.write_text(json.dumps(QUANT_CONFIG))
            subprocess.run([ws.flotilla, "init", "--config", str(cfg), "--seed", "1", "--out", str(src)],
                           check=True, capture_output=True, timeout=120)
        dst = ws.case_dir / "float_model"
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        return dst

    def quant_model(ws) -> Path:
        """A fresh copy of the 4-bit, group-size-32 conversion of that model."""
        src = ws.root / "valid_q4"
        if not src.exists():
            f = float_model(ws)
            subprocess.run([ws.flotilla, "convert", "--model", str(f), "--out", str(src), "--quantize", "4",
                            "--group-size", "32"], check=True, capture_output=True, timeout=120)
        dst = ws.case_dir / "q4_model"
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        return dst

    @case("control_convert_quantize")
    def _(ws):
        m = float_model(ws)
        out = ws.fresh_out()
        return Run(["convert", "--model", str(m), "--out", str(out), "-q", "4", "--group-size", "32"],
                   kind="control", preserve=[m], creates=[out / "config.json", out / "model.safetensors"])

    @case("control_generate_quantized")
    def _(ws):
        m = quant_model(ws)
        return Run(generate(m), kind="control", preserve=[m])

    @case("control_lora_train_quantized")
    def _(ws):
        m = quant_model(ws)
        out = ws.fresh_out()
        return Run(train(ws, m, out=out) + ["--fine-tune-type", "lora"], kind="control", preserve=[m],
                   creates=[out / "adapter_model.safetensors"])

    @case("quant_config_bits_do_not_match_packed_shape")
    def _(ws):
        m = quant_model(ws)
        edit_json(m / "config.json", lambda c: c["quantization"].update(bits=8))
        return Run(score(m), ["config.json", "bits", "packed shape", ("does not match", "match")], preserve=[m])

    @case("quant_group_size_does_not_divide_dimension")
    def _(ws):
        m = quant_model(ws)
        edit_json(m / "config.json", lambda c: c["quantization"].update(group_size=48))
        return Run(score(m), ["group_size 48", "divide"], preserve=[m])

    @case("quant_scales_shape_wrong")
    def _(ws):
        m = quant_model(ws)
        name = "model.layers.0.self_attn.q_proj.scales"

        def edit(header, data):
            rows, groups = header[name]["shape"]
            header[name]["shape"] = [rows * groups, 1]  # same bytes, wrong shape
        edit_safetensors(m / "model.safetensors", edit)
        return Run(score(m), [name, "shape", "group_size"], preserve=[m])

    @case("quant_weight_not_packed_u32")
    def _(ws):
        m = quant_model(ws)
        name = "model.layers.1.mlp.up_proj.weight"

        def edit(header, data):
            header[name]["dtype"] = "F32"  # same bytes per element
        edit_safetensors(m / "model.safetensors", edit)
        return Run(score(m), [name, "U32"], preserve=[m])

    @case("quant_config_without_quantized_tensors")
    def _(ws):
        m = float_model(ws)
        edit_json(m / "config.json", lambda c: c.update(quantization={"group_size": 32, "bits": 4}))
        return Run(score(m), ["quantization", "scales"], preserve=[m])

    @case("quant_tensors_without_quantization_config")
    def _(ws):
        m = quant_model(ws)
        edit_json(m / "config.json", lambda c: c.pop("quantization"))
        return Run(score(m), ["scales", "quantization"], preserve=[m])

    @case("quant_unsupported_bits_in_config")
    def _(ws):
        m = quant_model(ws)
        edit_json(m / "config.json", lambda c: c["quantization"].update(bits=3))
        return Run(score(m), ["bits", "3"], preserve=[m])

    @case("quant_full_fine_tune_refused")
    def _(ws):
        m = quant_model(ws)
        return Run(train(ws, m), ["quantized", "de-quantize"], preserve=[m, ws.corpus])

    @case("convert_onto_existing_directory")
    def _(ws):
        m = float_model(ws)
        out = ws.fresh_out()
        out.mkdir()
        (out / "precious.txt").write_text("a user's file\n")
        return Run(["convert", "--model", str(m), "--out", str(out), "-q", "4", "--group-size", "32"],
                   ["out", "not empty"], preserve=[m, out])

    @case("convert_group_size_divides_no_dimension")
    def _(ws):
        # 48 divides neither 64 nor 128: nothing would be quantized (one that divides some
        # layers leaves the others float: quant_smoke_test.py).
        m = float_model(ws)
        out = ws.fresh_out()
        return Run(["convert", "--model", str(m), "--out", str(out), "-q", "4", "--group-size", "48"],
                   ["group size 48", "divides no", "input dimension"], preserve=[m, out])

    @case("convert_unsupported_bits")
    def _(ws):
        m = float_model(ws)
        out = ws.fresh_out()
        return Run(["convert", "--model", str(m), "--out", str(out), "-q", "3"], ["3 bits"], preserve=[m, out])
