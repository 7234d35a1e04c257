"""Bad-input cases for flags outside their domain and for loops that must end, registered
into bad_input_test.py's case list (issue 18, items 1 and 2).

Every flag with a domain is refused before anything loads, with one line naming the flag
and the value: NaN and infinite learning rates and weight decay, betas outside [0, 1),
negative clip / warm-up / checkpoint counts, a --seq-len beyond the model's positions
(train, eval, grads), NaN or negative sampling parameters. The controls show that a
validation pass of "all batches" (--eval-batches 0 or -1) over raw text ends.
"""

import json
from pathlib import Path


def register_limit_cases(case, Run, ws_helpers):
    score, generate, train, edit_json, edit_safetensors = ws_helpers

    # -- 18.1: every loop over a data source ends

    for value in ("0", "-1"):
        @case(f"control_train_eval_batches_{value}_raw_text")
        def _(ws, value=value):
            m = ws.model()
            out = ws.fresh_out()
            argv = train(ws, m, out=out)
            argv[argv.index("--eval-batches") + 1] = value
            return Run(argv, kind="control", preserve=[m, ws.corpus],
                       creates=[out / "model.safetensors", out / "metrics.jsonl"])

    # -- 18.2: flags outside their domain, refused up front (no output folder made)

    train_domain = [
        ("lr_nan", ["--lr", "nan"], ["--lr", "nan"]),
        ("lr_inf", ["--lr", "inf"], ["--lr", "inf"]),
        ("lr_negative", ["--lr=-0.001"], ["--lr", "-0.001"]),
        ("min_lr_nan", ["--min-lr", "nan"], ["--min-lr", "nan"]),
        ("beta1_one", ["--beta1", "1"], ["--beta1", "[0, 1)"]),
        ("beta2_above_one", ["--beta2", "1.5"], ["--beta2", "1.5"]),
        ("beta2_nan", ["--beta2", "nan"], ["--beta2", "nan"]),
        ("weight_decay_nan", ["--weight-decay", "nan"], ["--weight-decay", "nan"]),
        ("weight_decay_negative", ["--weight-decay=-0.1"], ["--weight-decay", "-0.1"]),
        ("grad_clip_negative", ["--grad-clip=-1"], ["--grad-clip", "-1"]),
        ("grad_clip_inf", ["--grad-clip", "inf"], ["--grad-clip", "inf"]),
        ("warmup_negative", ["--warmup=-3"], ["--warmup", "-3"]),
        ("keep_checkpoints_negative", ["--keep-checkpoints=-2"], ["--keep-checkpoints", "-2"]),
        ("checkpoint_replicas_negative", ["--checkpoint-replicas=-1"], ["--checkpoint-replicas", "-1"]),
        ("bucket_mb_nan", ["--bucket-mb", "nan"], ["--bucket-mb", "nan"]),
        ("timeout_nan", ["--timeout", "nan"], ["--timeout", "nan"]),
        ("seq_len_beyond_positions", ["--seq-len", "4096"], ["--seq-len 4096", "512"]),
        ("outer_lr_inf", ["--sync-every", "4", "--outer-lr", "inf"], ["--outer-lr", "inf"]),
        ("lora_alpha_nan", ["--fine-tune-type", "lora", "--lora-alpha", "nan"], ["alpha", "nan"]),
        ("dtype_unknown", ["--dtype", "fp8"], ["--dtype", "fp8", "bf16"]),
    ]
    for name, flags, needles in train_domain:
        @case(f"train_{name}")
        def _(ws, flags=flags, needles=needles):
            m = ws.model()
            out = ws.fresh_out()
            argv = train(ws, m, out=out)
            if flags[0] == "--seq-len":  # replace the helper's own --seq-len
                argv[argv.index("--seq-len") + 1] = flags[1]
            else:
                argv += flags
            return Run(argv, needles, preserve=[m, ws.corpus], absent=[out])

    @case("eval_seq_len_beyond_positions")
    def _(ws):
        m = ws.model()
        return Run(["eval", "--model", str(m), "--data", str(ws.corpus), "--seq-len", "1024"],
                   ["--seq-len 1024", "512"], preserve=[m, ws.corpus])

    @case("grads_rows_beyond_positions")
    def _(ws):
        m = ws.model()
        batch = ws.case_dir / "batch.json"
        row = [i % 200 for i in range(600)]
        batch.write_text(json.dumps({"tokens": [row], "targets": [row]}))
        out = ws.case_dir / "grads.safetensors"
        return Run(["grads", "--model", str(m), "--batch", str(batch), "--out", str(out)],
                   ["batch.json", "600", "512"], preserve=[m, batch], absent=[out])

    sampling_domain = [
        ("temperature_nan", ["--temperature", "nan"], ["--temperature", "nan"]),
        ("temperature_negative", ["--temperature=-1"], ["--temperature", "-1"]),
        ("temperature_inf", ["--temperature", "inf"], ["--temperature", "inf"]),
        ("top_p_nan", ["--top-p", "nan"], ["--top-p", "nan"]),
        ("top_p_zero", ["--top-p", "0"], ["--top-p", "(0, 1]"]),
        ("top_p_above_one", ["--top-p", "1.5"], ["--top-p", "1.5"]),
    ]
    for name, flags, needles in sampling_domain:
        @case(f"generate_{name}")
        def _(ws, flags=flags, needles=needles):
            m = ws.model()
            return Run(generate(m) + flags, needles, preserve=[m])
