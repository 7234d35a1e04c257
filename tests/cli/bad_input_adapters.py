"""Bad-input cases for LoRA adapters (PEFT folders: adapter_config.json + adapter_model.safetensors)
given to `generate --adapter`, `train --resume-adapter-file` and `fuse`, registered into
bad_input_test.py's case list (kept apart so that file stays readable).

Two adapter folders are trained once per run: one on the valid tiny model, and one on a
"wide" model that differs from it only in hidden size (96 against 64), the adapters a user
gets by pointing at the wrong base. Each case copies what it breaks into its own directory.

Wrong-type keys in a YAML `train -c` file are config_file_test.py's case
wrong_type_names_file_line_and_key, not repeated here.
"""

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

WIDE_CHANGES = {"hidden_size": 96, "head_dim": 24, "intermediate_size": 256}
LORA = ["--fine-tune-type", "lora"]
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # first tensor the loader reads


def register_adapter_cases(case, Run, ws_helpers):
    score, generate, train, edit_json, edit_safetensors = ws_helpers

    def trained_adapter(ws, model: Path, name: str) -> Path:
        """A fresh copy of the LoRA adapters trained for one step on `model` (made once per run)."""
        src = ws.root / f"adapters_{name}"
        if not src.exists():
            subprocess.run([ws.flotilla, *train(ws, model, out=src), *LORA], check=True, capture_output=True,
                           timeout=120)
        dst = ws.case_dir / f"adapters_{name}"
        shutil.copytree(src, dst)
        return dst

    def adapter(ws) -> Path:
        """Adapters of the valid tiny model (q_proj, v_proj of both layers, rank 8)."""
        return trained_adapter(ws, ws.valid_model, "tiny")

    def other_model_adapter(ws) -> Path:
        """Adapters of a model like the valid one but 96 wide: every lora_A is [8, 96], not [8, 64]."""
        wide = ws.root / "wide_model"
        if not wide.exists():
            cfg = json.loads((ws.valid_model / "config.json").read_text())
            cfg.update(WIDE_CHANGES)
            (ws.root / "wide_config.json").write_text(json.dumps(cfg))
            subprocess.run([ws.flotilla, "init", "--config", str(ws.root / "wide_config.json"), "--seed", "2",
                            "--out", str(wide)], check=True, capture_output=True, timeout=120)
        return trained_adapter(ws, wide, "wide")

    def generate_with(model: Path, adapters: Path):
        return generate(model) + ["--adapter", str(adapters)]

    def resume_from(ws, model: Path, adapters: Path, out: Optional[Path] = None):
        return train(ws, model, out=out) + LORA + ["--resume-adapter-file", str(adapters)]

    def fuse(model: Path, adapters: Path, out: Path, *extra: str):
        return ["fuse", "--model", str(model), "--adapter", str(adapters), "--out", str(out), *extra]

    # -- controls: the adapters of this model train, generate, resume and fuse

    @case("control_adapter_train")
    def _(ws):
        m = ws.model()
        out = ws.fresh_out()
        return Run(train(ws, m, out=out) + LORA, kind="control", preserve=[m, ws.corpus],
                   creates=[out / "adapter_model.safetensors", out / "adapter_config.json"])

    @case("control_generate_with_adapter")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        return Run(generate_with(m, a), kind="control", preserve=[m, a])

    @case("control_train_resume_adapter")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        out = ws.fresh_out()
        return Run(resume_from(ws, m, a, out), kind="control", preserve=[m, a, ws.corpus],
                   creates=[out / "adapter_model.safetensors", out / "adapter_config.json"])

    @case("control_fuse_adapter")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        out = ws.fresh_out()
        return Run(fuse(m, a, out), kind="control", preserve=[m, a],
                   creates=[out / "config.json", out / "model.safetensors"])

    # -- adapters trained on another model: the first tensor read has the other width

    OTHER_MODEL = ["adapter_model.safetensors", A0, "shape [8, 96]", "expected [8, 64]"]

    @case("adapter_other_model_generate")
    def _(ws):
        m, a = ws.model(), other_model_adapter(ws)
        return Run(generate_with(m, a), OTHER_MODEL, preserve=[m, a])

    @case("adapter_other_model_train_resume")
    def _(ws):
        m, a = ws.model(), other_model_adapter(ws)
        return Run(resume_from(ws, m, a), OTHER_MODEL, preserve=[m, a, ws.corpus], absent=[ws.fresh_out()])

    @case("adapter_other_model_fuse_creates_no_output")
    def _(ws):
        m, a = ws.model(), other_model_adapter(ws)
        out = ws.case_dir / "fused"
        return Run(fuse(m, a, out), OTHER_MODEL, preserve=[m, a], absent=[out])

    @case("adapter_other_model_fuse_force_keeps_existing_output")
    def _(ws):
        # --force allows writing into a non-empty directory: the adapters must be refused
        # before the earlier fused model there is touched.
        m, a = ws.model(), other_model_adapter(ws)
        out = ws.model("fused_yesterday")
        (out / "notes.txt").write_text("how this model was fused\n")
        return Run(fuse(m, a, out, "--force"), OTHER_MODEL, preserve=[m, a, out])

    # -- adapter_model.safetensors that does not fit this adapter_config.json and model

    @case("adapter_tensor_renamed_to_missing_layer")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        renamed = A0.replace("layers.0.", "layers.7.")  # the model has layers 0 and 1
        edit_safetensors(a / "adapter_model.safetensors", lambda h, d: h.update({renamed: h.pop(A0)}))
        return Run(generate_with(m, a), ["adapter_model.safetensors", renamed, "unexpected"], preserve=[m, a])

    @case("adapter_tensor_renamed_to_unknown_module")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        renamed = A0.replace("q_proj", "qkv_proj")
        edit_safetensors(a / "adapter_model.safetensors", lambda h, d: h.update({renamed: h.pop(A0)}))
        return Run(resume_from(ws, m, a), ["adapter_model.safetensors", renamed, "unexpected"],
                   preserve=[m, a, ws.corpus])

    @case("adapter_weights_missing")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        (a / "adapter_model.safetensors").unlink()
        return Run(generate_with(m, a), ["adapter_model.safetensors"], preserve=[m, a])

    @case("adapter_config_rank_not_matching_tensors")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(r=4))
        return Run(generate_with(m, a), ["adapter_model.safetensors", A0, "shape [8, 64]", "expected [4, 64]"],
                   preserve=[m, a])

    # -- adapter_config.json: wrong types, missing keys, settings this model cannot take

    @case("adapter_config_rank_wrong_type")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(r="eight"))
        return Run(generate_with(m, a), ["adapter_config.json", "'r'", "integer", "eight"], preserve=[m, a])

    @case("adapter_config_rank_fractional")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(r=8.5))  # was read as 8
        return Run(generate_with(m, a), ["adapter_config.json", "'r'", "integer", "8.5"], preserve=[m, a])

    @case("adapter_config_rank_missing")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.pop("r"))
        return Run(resume_from(ws, m, a), ["adapter_config.json", "missing", "'r'"], preserve=[m, a, ws.corpus])

    @case("adapter_config_rank_unallocatable")
    def _(ws):
        # 10^13 x 64 floats per tensor: refused from the model's dimensions, not by std::bad_alloc.
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(r=10 ** 13))
        return Run(generate_with(m, a), ["adapter_config.json", "rank 10000000000000", "q_proj (64 x 64)"],
                   preserve=[m, a])

    @case("adapter_config_alpha_wrong_type")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(lora_alpha="16"))
        return Run(generate_with(m, a), ["adapter_config.json", "lora_alpha", "number"], preserve=[m, a])

    @case("adapter_config_unknown_target_module")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(target_modules=["q_proj", "qkv_proj"]))
        return Run(generate_with(m, a), ["adapter_config.json", "target_modules", "qkv_proj"], preserve=[m, a])

    @case("adapter_config_target_modules_wrong_type")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(target_modules={"q_proj": True}))
        return Run(generate_with(m, a), ["adapter_config.json", "target_modules", "list of module names"],
                   preserve=[m, a])

    @case("adapter_config_layers_not_the_last")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(layers_to_transform=[0], layers_pattern="layers"))
        return Run(generate_with(m, a), ["adapter_config.json", "layers_to_transform [0]", "last N layers"],
                   preserve=[m, a])

    @case("adapter_config_layers_wrong_type")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(layers_to_transform="last"))
        return Run(resume_from(ws, m, a), ["adapter_config.json", "layers_to_transform", "layer index"],
                   preserve=[m, a, ws.corpus])

    @case("adapter_config_not_an_object")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        (a / "adapter_config.json").write_text('["q_proj", "v_proj"]\n')
        return Run(generate_with(m, a), ["adapter_config.json", "object"], preserve=[m, a])

    @case("adapter_config_truncated_json")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        text = (a / "adapter_config.json").read_text()
        (a / "adapter_config.json").write_text(text[:len(text) // 2])
        return Run(generate_with(m, a), ["adapter_config.json", "not JSON"], preserve=[m, a])

    @case("adapter_config_bad_fuse_force_keeps_existing_output")
    def _(ws):
        m, a = ws.model(), adapter(ws)
        edit_json(a / "adapter_config.json", lambda c: c.update(r="eight"))
        out = ws.model("fused_yesterday")
        return Run(fuse(m, a, out, "--force"), ["adapter_config.json", "'r'"], preserve=[m, a, out])
