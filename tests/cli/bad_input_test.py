#!/usr/bin/python3
"""Bad input to the flotilla binary: one clear error line, a non-zero exit, no crash, no hang.

Usage: bad_input_test.py <path/to/flotilla> [-k SUBSTRING] [--keep]

The script writes a valid tiny model with `flotilla init --preset tiny`, derives one broken
copy per case in a temporary directory and runs a command that has to read the broken part.
Every error case must:

  - exit with a code in 1..127 (not a signal, not a shell's 128+signal), and the code 2
    that main() gives an InputError, unless the case says otherwise;
  - finish within CASE_TIMEOUT_S (a hang is a failure);
  - print exactly one non-empty line on stderr, starting with "flotilla: error:"
    (CLI11 parse errors, kind "cli11", may print more and only need a non-zero exit);
  - name what is wrong: every entry of the case's `needles` appears in that line
    (case-insensitive; a tuple entry means any one of its alternatives);
  - print no sanitizer report or crash marker on stdout or stderr;
  - leave every file the user already had byte-for-byte unchanged.

"control" cases run the same commands on valid input and must succeed: without them an
error case could pass because every run fails for an unrelated reason.

Run it against an AddressSanitizer build as well (cmake -DFLOTILLA_SANITIZE=address,undefined):
ASAN_OPTIONS / UBSAN_OPTIONS are set for every run so that a sanitizer report ends the
process with a report on stderr, which the stderr checks catch.

Known library bugs are listed in EXPECTED_FAIL: such a case must still fail (it is reported
XFAIL); when it starts to pass it is reported XPASS and fails the run, so that the entry is
removed from the list instead of hiding a fixed bug's regression later.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

# Cases that fail because of a known library bug: name -> where the bug is. Remove an entry
# once the library is fixed (the run reports XPASS and fails until then).
EXPECTED_FAIL: Dict[str, str] = {}

CASE_TIMEOUT_S = 30.0  # a tiny model loads in milliseconds, even under ASan
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
CRASH_MARKERS = (
    "AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer", "runtime error",
    "Segmentation", "terminate called", "Aborted", "core dumped", "std::bad_alloc",
)
# Exception text meant for programmers, not users: nlohmann::json's "[json.exception.type_error.302] ".
INTERNAL_TAGS = ("[json.exception",)
ERROR_PREFIX = "flotilla: error:"
INPUT_ERROR_EXIT = 2  # main(): InputError -> 2, any other exception -> 1

Needle = Union[str, Tuple[str, ...]]


# ---- Test fixtures: a valid model and safetensors surgery ----------------------------------

def read_safetensors(path: Path):
    """(header dict in file order, data section bytes) of a well-formed safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def write_raw_safetensors(path: Path, header_length: int, header: bytes, data: bytes = b"") -> None:
    """A file whose 8-byte length field says `header_length`, whatever follows it."""
    path.write_bytes(struct.pack("<Q", header_length) + header + data)


def edit_safetensors(path: Path, edit: Callable[[dict, bytes], Optional[bytes]]) -> None:
    """Rewrites `path` after edit(header, data) changed the header in place (and may return
    new data bytes)."""
    header, data = read_safetensors(path)
    new_data = edit(header, data)
    write_safetensors(path, header, data if new_data is None else new_data)


def retile(header: dict, data: bytes) -> bytes:
    """The data section rebuilt from each tensor's current [begin, end) in header order, with
    the offsets renumbered to tile it: after a tensor was dropped or cut, the file is again
    one the format allows (no gaps), so what is tested is the model's reading of it."""
    out = bytearray()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [len(out), len(out) + end - begin]
        out += data[begin:end]
    return bytes(out)


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def shard_model(model: Path) -> None:
    """Replaces model.safetensors by two shards and model.safetensors.index.json, as
    transformers' save_pretrained does for large models."""
    header, data = read_safetensors(model / "model.safetensors")
    metadata = header.pop("__metadata__", {"format": "pt"})
    names = list(header)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        shard_name = f"model-{i + 1:05d}-of-{len(halves):05d}.safetensors"
        shard_header = {"__metadata__": metadata}
        shard_data = bytearray()
        for name in part:
            begin, end = header[name]["data_offsets"]
            entry = dict(header[name])
            entry["data_offsets"] = [len(shard_data), len(shard_data) + end - begin]
            shard_data += data[begin:end]
            shard_header[name] = entry
            weight_map[name] = shard_name
        write_safetensors(model / shard_name, shard_header, bytes(shard_data))
    (model / "model.safetensors").unlink()
    index = {"metadata": {"total_size": len(data)}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def snapshot(path: Path) -> Dict[str, bytes]:
    """Every file under `path` (or `path` itself) -> its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.is_dir():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def corpus_text() -> str:
    words = ("the fleet sails as one while each ship holds what it must of the model and "
             "trains on its part of the data").split()
    paragraphs = []
    for i in range(120):
        paragraphs.append(" ".join(words[(i + j) % len(words)] for j in range(40)))
    return "\n\n".join(paragraphs) + "\n"


# ---- Cases ---------------------------------------------------------------------------------

@dataclass
class Run:
    argv: List[str]                 # flotilla's arguments
    needles: Sequence[Needle] = ()  # what the error line (for a control: its warnings) must name
    kind: str = "error"             # "error", "cli11" (CLI11 parse error) or "control" (must succeed)
    exit_code: Optional[int] = INPUT_ERROR_EXIT  # for "error": the exact code, None for any 1..127
    preserve: List[Path] = field(default_factory=list)  # must be byte-identical afterwards
    creates: List[Path] = field(default_factory=list)   # "control": must exist afterwards
    absent: List[Path] = field(default_factory=list)    # must not exist afterwards (an output left unmade)


class Workspace:
    """One directory per case under a shared temp root, and the valid model to copy."""

    def __init__(self, root: Path, flotilla: str):
        self.root = root
        self.flotilla = flotilla
        self.valid_model = root / "valid_model"
        self.corpus = root / "corpus.txt"
        self.case_dir: Path = root

    def begin(self, case_name: str) -> Path:
        self.case_dir = self.root / case_name
        self.case_dir.mkdir()
        return self.case_dir

    def model(self, name: str = "model") -> Path:
        """A fresh copy of the valid model in this case's directory."""
        dst = self.case_dir / name
        shutil.copytree(self.valid_model, dst)
        return dst

    def fresh_out(self) -> Path:
        return self.case_dir / "out"


def score(model: Path, tokens: str = "1,2,3") -> List[str]:
    return ["score", "--model", str(model), "--tokens", tokens]


def generate(model: Path) -> List[str]:
    return ["generate", "--model", str(model), "--prompt", "the fleet", "--max-tokens", "4"]


def train(ws: Workspace, model: Path, data: Optional[Path] = None, out: Optional[Path] = None) -> List[str]:
    return ["train", "--model", str(model), "--data", str(data or ws.corpus),
            "--out", str(out or ws.fresh_out()), "--steps", "1", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--log-every", "1"]


CaseFn = Callable[[Workspace], Run]
CASES: List[Tuple[str, CaseFn]] = []


def case(name: str):
    def register(fn: CaseFn) -> CaseFn:
        CASES.append((name, fn))
        return fn
    return register


# -- controls: the same commands on valid input succeed

@case("control_score")
def _(ws):
    m = ws.model()
    return Run(score(m), kind="control", preserve=[m])


@case("control_generate")
def _(ws):
    m = ws.model()
    return Run(generate(m), kind="control", preserve=[m])


@case("control_train")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    return Run(train(ws, m, out=out), kind="control", preserve=[m, ws.corpus],
               creates=[out / "config.json", out / "model.safetensors"])


@case("control_score_sharded")
def _(ws):
    m = ws.model()
    shard_model(m)
    return Run(score(m), kind="control", preserve=[m])


# -- config.json

@case("config_missing")
def _(ws):
    m = ws.model()
    (m / "config.json").unlink()
    return Run(score(m), ["config.json"], preserve=[m])


@case("config_truncated_json")
def _(ws):
    m = ws.model()
    text = (m / "config.json").read_text()
    (m / "config.json").write_text(text[:len(text) // 2])
    return Run(score(m), ["config.json", "json"], preserve=[m])


@case("config_empty_file")
def _(ws):
    m = ws.model()
    (m / "config.json").write_bytes(b"")
    return Run(generate(m), ["config.json"], preserve=[m])


@case("config_not_an_object")
def _(ws):
    m = ws.model()
    (m / "config.json").write_text("[1, 2, 3]\n")
    return Run(score(m), ["config.json", "object"], preserve=[m])


@case("config_unknown_model_type")
def _(ws):
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    return Run(score(m), ["config.json", "model_type", "gpt2"], preserve=[m])


@case("config_missing_hidden_size")
def _(ws):
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.pop("hidden_size"))
    return Run(score(m), ["config.json", "hidden_size"], preserve=[m])


@case("config_hidden_size_wrong_type")
def _(ws):
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.update(hidden_size="big"))
    return Run(generate(m), ["config.json", "hidden_size"], preserve=[m])


@case("config_heads_not_divisible_by_kv_heads")
def _(ws):
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.update(num_key_value_heads=3))
    return Run(train(ws, m), ["config.json", "num_key_value_heads"], preserve=[m, ws.corpus])


@case("config_negative_num_hidden_layers")
def _(ws):
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.update(num_hidden_layers=-1))
    return Run(score(m), ["config.json", "num_hidden_layers"], preserve=[m])


@case("config_vocab_size_unallocatable")
def _(ws):
    # 2^40 x 64 floats (256 TiB) cannot be allocated: the answer must be an error line that
    # names config.json, not a bare std::bad_alloc or an out-of-memory kill.
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.update(vocab_size=2 ** 40))
    return Run(score(m), ["config.json", "vocab_size"], preserve=[m])


@case("config_hidden_size_overflows_int64")
def _(ws):
    # hidden_size 2^40: a q_proj of 2^40 x 2^40 elements overflows int64 unless checked.
    m = ws.model()
    edit_json(m / "config.json", lambda c: c.update(hidden_size=2 ** 40, head_dim=2 ** 38))
    return Run(score(m), ["config.json", "hidden_size"], preserve=[m])


# -- model.safetensors: the file and its header

@case("safetensors_missing")
def _(ws):
    m = ws.model()
    (m / "model.safetensors").unlink()
    return Run(score(m), ["model.safetensors"], preserve=[m])


@case("safetensors_empty_file")
def _(ws):
    m = ws.model()
    (m / "model.safetensors").write_bytes(b"")
    return Run(score(m), ["model.safetensors", ("0 bytes", "empty", "too short", "truncated")],
               preserve=[m])


@case("safetensors_header_length_exceeds_file")
def _(ws):
    m = ws.model()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return Run(train(ws, m), ["model.safetensors", "header"], preserve=[m, ws.corpus])


@case("safetensors_header_length_absurd")
def _(ws):
    m = ws.model()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2 ** 63) + raw[8:])
    return Run(score(m), ["model.safetensors", "header"], preserve=[m])


@case("safetensors_header_length_max_u64")
def _(ws):
    # 2^64 - 1: 8 + length wraps around to 7 in unsigned arithmetic.
    m = ws.model()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2 ** 64 - 1) + raw[8:])
    return Run(score(m), ["model.safetensors", "header"], preserve=[m])


@case("safetensors_header_not_json")
def _(ws):
    m = ws.model()
    garbage = b"this is not JSON at all {"
    write_raw_safetensors(m / "model.safetensors", len(garbage), garbage, b"\0" * 64)
    return Run(generate(m), ["model.safetensors", "json"], preserve=[m])


@case("safetensors_header_not_object")
def _(ws):
    m = ws.model()
    header = b"[1, 2, 3]"
    write_raw_safetensors(m / "model.safetensors", len(header), header)
    return Run(score(m), ["model.safetensors", "object"], preserve=[m])


@case("safetensors_header_deeply_nested")
def _(ws):
    # Deep nesting must not exhaust the stack of a recursive parser.
    m = ws.model()
    header = b"[" * 100000 + b"]" * 100000
    write_raw_safetensors(m / "model.safetensors", len(header), header)
    return Run(score(m), ["model.safetensors", ("nest", "deep", "object")], preserve=[m])


@case("safetensors_unknown_dtype")
def _(ws):
    m = ws.model()
    edit_safetensors(m / "model.safetensors",
                     lambda h, d: h["model.layers.0.mlp.up_proj.weight"].update(dtype="Q7"))
    return Run(score(m), ["model.safetensors", "model.layers.0.mlp.up_proj.weight", "Q7"], preserve=[m])


@case("safetensors_data_offsets_out_of_range")
def _(ws):
    m = ws.model()

    def edit(h, d):
        begin, end = h["lm_head.weight"]["data_offsets"]
        h["lm_head.weight"]["data_offsets"] = [len(d), len(d) + end - begin]
    edit_safetensors(m / "model.safetensors", edit)
    return Run(score(m), ["model.safetensors", "lm_head.weight", "data_offsets"], preserve=[m])


@case("safetensors_data_offsets_reversed")
def _(ws):
    m = ws.model()

    def edit(h, d):
        begin, end = h["model.layers.1.self_attn.k_proj.weight"]["data_offsets"]
        h["model.layers.1.self_attn.k_proj.weight"]["data_offsets"] = [end, begin]
    edit_safetensors(m / "model.safetensors", edit)
    return Run(score(m), ["model.safetensors", "model.layers.1.self_attn.k_proj.weight", "data_offsets"],
               preserve=[m])


@case("safetensors_data_offsets_negative")
def _(ws):
    m = ws.model()
    edit_safetensors(m / "model.safetensors",
                     lambda h, d: h["model.norm.weight"].update(data_offsets=[-256, 0]))
    return Run(score(m), ["model.safetensors", "model.norm.weight", "data_offsets"], preserve=[m])


@case("safetensors_byte_length_not_matching_shape")
def _(ws):
    m = ws.model()

    def edit(h, d):
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [begin, end - 4]
    edit_safetensors(m / "model.safetensors", edit)
    return Run(score(m), ["model.safetensors", "model.norm.weight", ("bytes", "shape")], preserve=[m])


@case("safetensors_negative_dimension")
def _(ws):
    m = ws.model()
    edit_safetensors(m / "model.safetensors", lambda h, d: h["model.norm.weight"].update(shape=[-64]))
    return Run(score(m), ["model.safetensors", "model.norm.weight", "shape"], preserve=[m])


@case("safetensors_shape_overflows")
def _(ws):
    # 2^32 x 2^32 elements: the byte count overflows 64 bits unless checked.
    m = ws.model()
    edit_safetensors(m / "model.safetensors",
                     lambda h, d: h["model.norm.weight"].update(shape=[2 ** 32, 2 ** 32]))
    return Run(score(m), ["model.safetensors", "model.norm.weight", "shape"], preserve=[m])


@case("safetensors_file_truncated")
def _(ws):
    m = ws.model()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:-4096])
    return Run(score(m), ["model.safetensors", ("truncated", "out of range")], preserve=[m])


# -- model.safetensors: the tensors the model needs

@case("tensor_missing")
def _(ws):
    m = ws.model()

    def edit(h, d):
        del h["model.norm.weight"]
        return retile(h, d)
    edit_safetensors(m / "model.safetensors", edit)
    return Run(score(m), [m.name, "model.norm.weight"], preserve=[m])


@case("tensor_wrong_shape")
def _(ws):
    m = ws.model()

    def edit(h, d):
        begin, _ = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"].update(shape=[32], data_offsets=[begin, begin + 32 * 4])
        return retile(h, d)
    edit_safetensors(m / "model.safetensors", edit)
    return Run(generate(m), ["model.safetensors", "model.norm.weight", "[32]", "[64]"], preserve=[m])


@case("tensor_wrong_dtype_i32")
def _(ws):
    m = ws.model()
    edit_safetensors(m / "model.safetensors", lambda h, d: h["model.norm.weight"].update(dtype="I32"))
    return Run(train(ws, m), ["model.safetensors", "model.norm.weight", "I32"], preserve=[m, ws.corpus])


@case("tensor_unexpected_extra")
def _(ws):
    # A tensor the architecture does not have: config.json and the weights disagree.
    m = ws.model()

    def edit(h, d):
        h["model.layers.7.mlp.up_proj.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    edit_safetensors(m / "model.safetensors", edit)
    return Run(score(m), ["model.layers.7.mlp.up_proj.weight"], preserve=[m])


# -- sharded weights: model.safetensors.index.json

@case("index_names_missing_shard")
def _(ws):
    m = ws.model()
    shard_model(m)
    (m / "model-00002-of-00002.safetensors").unlink()
    return Run(score(m), ["model.safetensors.index.json", "model-00002-of-00002.safetensors"], preserve=[m])


@case("index_not_json")
def _(ws):
    m = ws.model()
    shard_model(m)
    p = m / "model.safetensors.index.json"
    p.write_text(p.read_text()[:100])
    return Run(generate(m), ["model.safetensors.index.json", "json"], preserve=[m])


@case("index_shard_outside_model_dir")
def _(ws):
    m = ws.model()
    shard_model(m)
    edit_json(m / "model.safetensors.index.json",
              lambda ix: ix["weight_map"].update({"model.norm.weight": "../../etc/passwd"}))
    return Run(score(m), ["model.safetensors.index.json", "model.norm.weight"], preserve=[m])


@case("index_tensor_missing_from_shard")
def _(ws):
    m = ws.model()
    shard_model(m)
    edit_json(m / "model.safetensors.index.json",
              lambda ix: ix["weight_map"].update({"model.norm.weight": "model-00001-of-00002.safetensors"}))
    return Run(score(m), ["model-00001-of-00002.safetensors", "model.norm.weight"], preserve=[m])


@case("shard_corrupt_header")
def _(ws):
    m = ws.model()
    shard_model(m)
    p = m / "model-00002-of-00002.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    return Run(score(m), ["model-00002-of-00002.safetensors", "header"], preserve=[m])


# -- tokenizer

@case("tokenizer_not_json")
def _(ws):
    m = ws.model()
    (m / "flotilla_tokenizer.json").write_text('{"type": "byt')
    return Run(generate(m), ["flotilla_tokenizer.json", "json"], preserve=[m])


# -- command-level input

@case("train_jsonl_malformed_line")
def _(ws):
    m = ws.model()
    data = ws.case_dir / "data.jsonl"
    data.write_text('{"text": "first line is fine"}\n'
                    '{"text": "so is the second"}\n'
                    '{"text": "the third is cut off\n'
                    '{"text": "fourth"}\n')
    return Run(train(ws, m, data=data), ["data.jsonl:3"], preserve=[m, data])


@case("train_data_empty_file")
def _(ws):
    m = ws.model()
    data = ws.case_dir / "empty.txt"
    data.write_bytes(b"")
    return Run(train(ws, m, data=data), ["empty.txt"], preserve=[m, data])


@case("score_token_id_out_of_range")
def _(ws):
    m = ws.model()
    return Run(score(m, tokens="1,99999"), ["99999", "vocab"], preserve=[m])


@case("score_token_id_negative")
def _(ws):
    m = ws.model()
    return Run(score(m, tokens="1,-5,2"), ["-5"], preserve=[m])


@case("score_token_not_a_number")
def _(ws):
    m = ws.model()
    return Run(score(m, tokens="1,two,3"), ["--tokens", "two"], preserve=[m])


@case("generate_max_tokens_zero")
def _(ws):
    m = ws.model()
    return Run(["generate", "--model", str(m), "--prompt", "hi", "--max-tokens", "0"],
               ["--max-tokens"], preserve=[m])


@case("grads_token_id_beyond_int32")
def _(ws):
    # 2^32 + 1 read into an int32 would wrap to the valid id 1 and run on the wrong input.
    m = ws.model()
    batch = ws.case_dir / "batch.json"
    batch.write_text(json.dumps({"tokens": [[1, 2 ** 32 + 1, 3]], "targets": [[2, 3, 4]]}))
    out = ws.case_dir / "grads.safetensors"
    return Run(["grads", "--model", str(m), "--batch", str(batch), "--out", str(out)],
               ["batch.json", "tokens"], preserve=[m, batch])


@case("train_out_not_empty")
def _(ws):
    m = ws.model()
    out = ws.case_dir / "earlier_run"
    out.mkdir()
    (out / "notes.txt").write_text("my notes from yesterday\n")
    shutil.copy(ws.valid_model / "model.safetensors", out / "model.safetensors")
    shutil.copy(ws.valid_model / "config.json", out / "config.json")
    return Run(train(ws, m, out=out), ["earlier_run", "--force"], preserve=[m, out, ws.corpus])


@case("train_out_is_a_file")
def _(ws):
    m = ws.model()
    out = ws.case_dir / "results.txt"
    out.write_text("precious results\n")
    return Run(train(ws, m, out=out), ["results.txt"], preserve=[m, out, ws.corpus])


@case("train_topk_density_out_of_range")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--compression", "topk", "--topk-density", "0"], ["top-k density"],
               preserve=[m, ws.corpus])


@case("train_compression_unknown")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--compression", "zip"], ["--compression", "zip"], preserve=[m, ws.corpus])


@case("train_compression_dtype_unknown")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--compression", "topk", "--compression-dtype", "f8"], ["--compression-dtype", "f8"],
               preserve=[m, ws.corpus])


@case("train_parallel_product_not_the_world")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    return Run(train(ws, m, out=out) + ["--parallel", "dp=2"], ["--parallel", "2 ranks", "has 1"],
               preserve=[m, ws.corpus], absent=[out])


@case("train_parallel_unknown_key")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--parallel", "dp=1,xp=1"], ["--parallel", "unknown key 'xp'"], preserve=[m, ws.corpus])


@case("train_parallel_zero")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--parallel", "dp=0"], ["--parallel", "dp = '0'"], preserve=[m, ws.corpus])


@case("train_parallel_experts_with_local_sgd_not_built")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--parallel", "ep=2", "--sync-every", "4"],
               ["local SGD (--sync-every) with expert parallelism is not built"], preserve=[m, ws.corpus])


@case("train_micro_batches_without_pipeline")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--micro-batches", "2"], ["--micro-batches applies to pipeline parallelism"],
               preserve=[m, ws.corpus])


@case("train_expert_capacity_on_a_dense_model")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--expert-capacity", "1.25"], ["expert capacity", "no experts"],
               preserve=[m, ws.corpus])


@case("train_expert_capacity_negative")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--expert-capacity", "-1"], ["expert capacity", ">= 0"], preserve=[m, ws.corpus])


@case("train_pp_schedule_unknown")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--pp-schedule", "interleaved"], ["--pp-schedule"], preserve=[m, ws.corpus])


@case("control_train_parallel_one_rank_mesh")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    return Run(train(ws, m, out=out) + ["--parallel", "dp=1,pp=1,tp=1"], kind="control", preserve=[m, ws.corpus],
               creates=[out / "model.safetensors"])


@case("train_compression_dtype_for_a_dense_codec")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--compression", "fp16", "--compression-dtype", "bf16"], ["compression dtype", "fp16"],
               preserve=[m, ws.corpus])


@case("train_save_every_off_the_local_sgd_meetings")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--sync-every", "4", "--save-every", "6"], ["--save-every 6", "--sync-every 4"],
               preserve=[m, ws.corpus])


@case("train_outer_momentum_out_of_range")
def _(ws):
    m = ws.model()
    return Run(train(ws, m) + ["--sync-every", "4", "--outer-momentum", "1.5"], ["--outer-momentum"],
               preserve=[m, ws.corpus])


@case("init_out_not_empty")
def _(ws):
    out = ws.model("my_model")
    (out / "notes.txt").write_text("my notes from yesterday\n")
    return Run(["init", "--preset", "tiny", "--seed", "7", "--out", str(out)], ["my_model", "--force"],
               preserve=[out])


@case("score_model_dir_missing")
def _(ws):
    return Run(score(ws.case_dir / "no_such_model"), ["no_such_model"], kind="cli11")


# -- flotilla plan: missing inputs, nonsense link figures, no machines

def plan(ws: Workspace, model: Path, *extra: str, data: Optional[Path] = None) -> List[str]:
    return ["plan", "--model", str(model), "--data", str(data or ws.corpus), "--batch-size", "2",
            "--seq-len", "16", "--measure-steps", "1", "--warmup-steps", "0", *extra]


@case("control_plan")
def _(ws):
    m = ws.model()
    out = ws.case_dir / "plan"
    return Run(plan(ws, m, "--hosts", "4", "--bandwidth", "1gbit", "--out", str(out)), kind="control",
               preserve=[m, ws.corpus], creates=[out / "plan.json", out / "speedup.svg"])


@case("plan_model_missing")
def _(ws):
    return Run(plan(ws, ws.case_dir / "no_such_model"), ["no_such_model", "--model"], preserve=[ws.corpus])


@case("plan_data_missing")
def _(ws):
    m = ws.model()
    return Run(plan(ws, m, data=ws.case_dir / "no_such_data.jsonl"), ["no_such_data.jsonl", "--data"], preserve=[m])


@case("plan_bandwidth_nonsense")
def _(ws):
    m = ws.model()
    return Run(plan(ws, m, "--hosts", "2", "--bandwidth", "fast"), ["--bandwidth", "fast"], preserve=[m])


@case("plan_latency_nonsense")
def _(ws):
    m = ws.model()
    return Run(plan(ws, m, "--hosts", "2", "--latency=-5us"), ["--latency", "-5us"], preserve=[m])


@case("plan_hosts_zero")
def _(ws):
    m = ws.model()
    return Run(plan(ws, m, "--hosts", "0"), ["--hosts", "0"], preserve=[m])


@case("plan_hostfile_garbage")
def _(ws):
    m = ws.model()
    hosts = ws.case_dir / "hosts"
    hosts.write_text("node1 slots=2\nnode2 cpus=lots\n")
    return Run(plan(ws, m, "--hostfile", str(hosts)), ["hosts:2", "cpus=lots"], preserve=[m, hosts])


@case("plan_out_not_empty")
def _(ws):
    m = ws.model()
    out = ws.case_dir / "earlier_plan"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    return Run(plan(ws, m, "--out", str(out)), ["earlier_plan", "--force"], preserve=[m, out])

# -- issue 18: hostile inputs. Outputs are checked before the first step (18.3); nothing is
# overwritten without --force, and never an input (18.4); errors say what and where (18.6);
# safetensors files the format forbids are refused, non-finite weights reported (18.7).

def prepare(ws: Workspace, model: Path, out: Path, *extra: str) -> List[str]:
    return ["data", "prepare", "--model", str(model), "--data", str(ws.case_dir / "data"), "--out", str(out), *extra]


def data_folder(ws: Workspace) -> Path:
    """A folder of train.jsonl and valid.jsonl, as data prepare reads it."""
    d = ws.case_dir / "data"
    d.mkdir()
    lines = [json.dumps({"text": p}) for p in corpus_text().split("\n\n") if p.strip()]
    (d / "train.jsonl").write_text("\n".join(lines[:100]) + "\n")
    (d / "valid.jsonl").write_text("\n".join(lines[100:]) + "\n")
    return d


def prepared_data(ws: Workspace, model: Path) -> Path:
    """A prepared dataset folder made now with this model's tokenizer."""
    data_folder(ws)
    out = ws.case_dir / "prepared"
    proc = subprocess.run([ws.flotilla, *prepare(ws, model, out)], capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"data prepare failed: {proc.stderr.decode()}")
    return out


def shrink_vocab(model: Path, vocab: int) -> None:
    """config.json's vocab_size and the embedding (and an untied lm_head) cut to `vocab` rows:
    a consistent model whose vocabulary is smaller than its tokenizer's."""
    config = json.loads((model / "config.json").read_text())
    old = config["vocab_size"]
    config["vocab_size"] = vocab
    for key in ("bos_token_id", "eos_token_id"):  # the byte tokenizer's 256 and 257 are past it
        config.pop(key, None)
    (model / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    header, data = read_safetensors(model / "model.safetensors")
    new_data = bytearray()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        chunk = data[begin:end]
        if entry["shape"] and entry["shape"][0] == old and name in ("model.embed_tokens.weight", "lm_head.weight"):
            row = (end - begin) // old
            chunk = chunk[:row * vocab]
            entry["shape"] = [vocab] + entry["shape"][1:]
        entry["data_offsets"] = [len(new_data), len(new_data) + len(chunk)]
        new_data += chunk
    write_safetensors(model / "model.safetensors", header, bytes(new_data))


def poison_weight(model: Path, tensor: str, value: float) -> None:
    """Element 3 of `tensor` (float32) becomes `value` (NaN or Inf)."""
    def edit(h, d):
        begin = h[tensor]["data_offsets"][0] + 3 * 4
        assert h[tensor]["dtype"] == "F32"
        return d[:begin] + struct.pack("<f", value) + d[begin + 4:]
    edit_safetensors(model / "model.safetensors", edit)


# 18.3: every output checked before the first step

@case("train_trace_folder_missing")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    trace = ws.case_dir / "no_such_folder" / "trace.json"
    return Run(train(ws, m, out=out) + ["--trace", str(trace)], ["--trace", "no_such_folder", "does not exist"],
               preserve=[m, ws.corpus], absent=[out])


@case("train_trace_is_a_directory")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    trace = ws.case_dir / "traces"
    trace.mkdir()
    return Run(train(ws, m, out=out) + ["--trace", str(trace)], ["--trace", "traces", "is a directory"],
               preserve=[m, ws.corpus, trace], absent=[out])


@case("train_trace_unwritable")
def _(ws):
    # /proc takes no new files, for root too: the trace could never be written.
    m = ws.model()
    out = ws.fresh_out()
    return Run(train(ws, m, out=out) + ["--trace", "/proc/flotilla_trace.json"], ["--trace", "cannot write into /proc"],
               preserve=[m, ws.corpus], absent=[out])


@case("train_out_unwritable")
def _(ws):
    m = ws.model()
    return Run(train(ws, m, out=Path("/proc/flotilla_run")), ["/proc/flotilla_run", "cannot write into /proc"],
               preserve=[m, ws.corpus])


@case("train_out_under_a_file")
def _(ws):
    m = ws.model()
    blocker = ws.case_dir / "results.txt"
    blocker.write_text("precious results\n")
    return Run(train(ws, m, out=blocker / "run"), ["results.txt", "not a folder"], preserve=[m, blocker, ws.corpus])


@case("control_train_trace")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    trace = ws.case_dir / "trace.json"
    return Run(train(ws, m, out=out) + ["--trace", str(trace)], kind="control", preserve=[m, ws.corpus],
               creates=[out / "model.safetensors", out / "metrics.jsonl", out / "report.json", trace])


# 18.4: nothing overwritten without --force; --force never destroys an input

@case("grads_out_exists_without_force")
def _(ws):
    m = ws.model()
    batch = ws.case_dir / "batch.json"
    batch.write_text(json.dumps({"tokens": [[1, 2, 3]], "targets": [[2, 3, 4]]}))
    out = ws.case_dir / "my_grads.safetensors"
    out.write_bytes(b"yesterday's gradients")
    return Run(["grads", "--model", str(m), "--batch", str(batch), "--out", str(out)], ["my_grads.safetensors", "--force"],
               preserve=[m, batch, out])


@case("grads_out_is_the_batch")
def _(ws):
    m = ws.model()
    batch = ws.case_dir / "batch.json"
    batch.write_text(json.dumps({"tokens": [[1, 2, 3]], "targets": [[2, 3, 4]]}))
    return Run(["grads", "--model", str(m), "--batch", str(batch), "--out", str(batch), "--force"],
               ["batch.json", "is the --batch"], preserve=[m, batch])


@case("train_trace_exists_without_force")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    trace = ws.case_dir / "trace.json"
    trace.write_text("[]\n")
    return Run(train(ws, m, out=out) + ["--trace", str(trace)], ["trace.json", "--force"],
               preserve=[m, ws.corpus, trace], absent=[out])


@case("train_force_out_is_the_model")
def _(ws):
    m = ws.model()
    return Run(train(ws, m, out=m) + ["--force"], ["--out", "is the --model"], preserve=[m, ws.corpus])


@case("train_force_out_contains_the_data")
def _(ws):
    m = ws.model()
    out = ws.case_dir / "run"
    out.mkdir()
    data = out / "corpus.txt"
    data.write_text(corpus_text())
    return Run(train(ws, m, data=data, out=out) + ["--force"], ["--out", "contains --data"], preserve=[m, out])


# data prepare --force never clears a folder that holds one of its inputs: out_of(ws, model,
# data) is the --out given.
for name, out_of, needle in (("data_folder", lambda ws, m, d: d, "is the --data"),
                             ("data_parent", lambda ws, m, d: ws.case_dir, "contains --data"),
                             ("model", lambda ws, m, d: m, "is the --model")):
    @case(f"data_prepare_force_out_is_the_{name}")
    def _(ws, out_of=out_of, needle=needle):
        m = ws.model()
        d = data_folder(ws)
        out = out_of(ws, m, d)
        return Run(prepare(ws, m, out, "--force"), ["--out", needle], preserve=[m, d, out])


@case("data_prepare_out_inside_the_model_via_dotdot")
def _(ws):
    m = ws.model()
    d = data_folder(ws)
    return Run(prepare(ws, m, d / ".." / "model" / "prepared"), ["--out", "is inside --model"], preserve=[m, d],
               absent=[m / "prepared"])


@case("convert_force_out_is_the_model")
def _(ws):
    m = ws.model()
    return Run(["convert", "--model", str(m), "--out", str(m), "--force"], ["--out", "is the --model"], preserve=[m])


def trained_run(ws: Workspace) -> Path:
    """A one-step run in this case's directory with its checkpoint (checkpoints/step-000001)."""
    m = ws.model()
    run_dir = ws.case_dir / "run"
    subprocess.run([ws.flotilla] + train(ws, m, out=run_dir) + ["--save-every", "1"], check=True, capture_output=True,
                   timeout=120)
    return run_dir


@case("control_convert_checkpoint")
def _(ws):
    run_dir = trained_run(ws)
    out = ws.fresh_out()
    return Run(["convert", "--checkpoint", str(run_dir), "--out", str(out)], kind="control", preserve=[run_dir],
               creates=[out / "config.json", out / "model.safetensors"])


@case("convert_checkpoint_into_a_non_empty_out")
def _(ws):
    run_dir = trained_run(ws)
    out = ws.fresh_out()
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return Run(["convert", "--checkpoint", str(run_dir), "--out", str(out)], [str(out), "--force"],
               preserve=[run_dir, out / "notes.txt"])


@case("convert_checkpoint_with_a_rank_file_missing")
def _(ws):
    run_dir = trained_run(ws)
    step = run_dir / "checkpoints" / "step-000001"
    (step / "rank-00000.safetensors").unlink()
    out = ws.fresh_out()
    return Run(["convert", "--checkpoint", str(step), "--out", str(out)], ["step-000001", "rank-00000.safetensors",
                                                                             "missing"], preserve=[step], absent=[out])


@case("convert_checkpoint_without_its_model")
def _(ws):
    run_dir = trained_run(ws)
    alone = ws.case_dir / "step-000001"
    shutil.copytree(run_dir / "checkpoints" / "step-000001", alone)
    out = ws.fresh_out()
    return Run(["convert", "--checkpoint", str(alone), "--out", str(out)], ["--model", "config.json"],
               preserve=[alone], absent=[out])


# -- mixture of experts (issue 16): inconsistent expert fields, a missing expert tensor

MIXTRAL_TINY = Path(__file__).resolve().parents[2] / "configs" / "mixtral-tiny.json"


def moe_config(ws: Workspace, edit: Callable[[dict], None]) -> Path:
    config = json.loads(MIXTRAL_TINY.read_text())
    edit(config)
    path = ws.case_dir / "config.json"
    path.write_text(json.dumps(config))
    return path


def moe_model(ws: Workspace) -> Path:
    """A valid mixtral-tiny model (8 experts, top 2) in this case's directory."""
    out = ws.case_dir / "moe_model"
    subprocess.run([ws.flotilla, "init", "--config", str(MIXTRAL_TINY), "--seed", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=CASE_TIMEOUT_S)
    return out


@case("moe_top_k_larger_than_experts")
def _(ws):
    path = moe_config(ws, lambda c: c.update(num_experts_per_tok=9))
    out = ws.fresh_out()
    return Run(["init", "--config", str(path), "--out", str(out)],
               ["config.json", "num_experts_per_tok", "(9)", "num_local_experts (8)"], preserve=[path], absent=[out])


@case("moe_zero_experts")
def _(ws):
    path = moe_config(ws, lambda c: c.update(num_local_experts=0))
    out = ws.fresh_out()
    return Run(["init", "--config", str(path), "--out", str(out)], ["config.json", "num_local_experts", "positive"],
               preserve=[path], absent=[out])


@case("moe_qwen2_moe_sparse_step_zero")
def _(ws):
    def edit(c):
        c.update(model_type="qwen2_moe", num_experts=4, moe_intermediate_size=32, decoder_sparse_step=0)
    path = moe_config(ws, edit)
    out = ws.fresh_out()
    return Run(["init", "--config", str(path), "--out", str(out)], ["config.json", "decoder_sparse_step"],
               preserve=[path], absent=[out])


@case("control_moe_generate")
def _(ws):
    m = moe_model(ws)
    return Run(generate(m), kind="control", preserve=[m])


@case("moe_weights_missing_an_expert")
def _(ws):
    m = moe_model(ws)

    def edit(h, d):
        del h["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
        return retile(h, d)
    edit_safetensors(m / "model.safetensors", edit)
    return Run(generate(m), ["model.layers.1.block_sparse_moe.experts.5.w3.weight"], preserve=[m])


@case("moe_config_has_fewer_experts_than_the_weights")
def _(ws):
    m = moe_model(ws)
    edit_json(m / "config.json", lambda c: c.update(num_local_experts=7))
    # The router is the first tensor whose shape the config contradicts: (8, C) for 7 experts.
    return Run(generate(m), ["block_sparse_moe.gate.weight", "[8, 64]", "[7, 64]"], preserve=[m])


@case("moe_lora_gate_proj_on_mixtral")
def _(ws):
    # A Mixtral layer has no gate_proj: its experts' projections are w1/w3/w2 (docs/moe.md).
    m = moe_model(ws)
    out = ws.fresh_out()
    argv = train(ws, m, out=out) + ["--fine-tune-type", "lora", "--lora-targets", "q,gate"]
    return Run(argv, ["mixtral", "gate_proj", "w1"], preserve=[m, ws.corpus], absent=[out])


def moe_mlx_model(ws: Workspace) -> Path:
    """mixtral-tiny converted to 4 bits in mlx_lm's layout: each projection's experts stacked
    into one tensor (model.layers.{i}.block_sparse_moe.switch_mlp.gate_proj.weight, (8, out, in/8))."""
    out = ws.case_dir / "moe_mlx"
    subprocess.run([ws.flotilla, "convert", "--model", str(moe_model(ws)), "--out", str(out), "--quantize", "4",
                    "--group-size", "32"], check=True, capture_output=True, timeout=CASE_TIMEOUT_S)
    return out


@case("control_moe_mlx_generate")
def _(ws):
    m = moe_mlx_model(ws)
    return Run(generate(m), kind="control", preserve=[m])


@case("moe_mlx_stack_missing_an_expert")
def _(ws):
    m = moe_mlx_model(ws)
    name = "model.layers.1.block_sparse_moe.switch_mlp.up_proj.scales"
    def edit(h, d):
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [begin, end - (end - begin) // 8]  # 7 of the 8 experts' slices
        h[name]["shape"][0] = 7
        return retile(h, d)
    edit_safetensors(m / "model.safetensors", edit)
    return Run(generate(m), [name, "[7,", "leading dimension of 8"], preserve=[m])


@case("moe_mlx_stack_flattened")
def _(ws):
    # The experts laid end to end in two dimensions (8 x out, in/8): no expert axis.
    m = moe_mlx_model(ws)
    name = "model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"
    def edit(h, d):
        e, rows, words = h[name]["shape"]
        h[name]["shape"] = [e * rows, words]
    edit_safetensors(m / "model.safetensors", edit)
    return Run(generate(m), [name, "leading dimension of 8"], preserve=[m])


@case("init_force_out_contains_the_config")
def _(ws):
    out = ws.case_dir / "new_model"
    out.mkdir()
    shutil.copy(ws.valid_model / "config.json", out / "config.json")
    return Run(["init", "--config", str(out / "config.json"), "--out", str(out), "--force"],
               ["--out", "contains --config"], preserve=[out])


# 18.6: every error names the thing and the fault

@case("train_batch_size_beyond_memory")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    argv = train(ws, m, out=out)
    argv[argv.index("--batch-size") + 1] = "2000000000"
    return Run(argv, ["B=2000000000", ("GiB", "any machine")],
               preserve=[m, ws.corpus], absent=[out])


@case("init_model_beyond_memory")
def _(ws):
    # 2^31 x 64 embedding rows (and as many in lm_head): 1 TiB of float32 weights, within what a config may say but
    # beyond this machine: refused with the sizes, not a bad_alloc or an out-of-memory kill.
    config = json.loads((ws.valid_model / "config.json").read_text())
    config.update(vocab_size=2 ** 31)
    for key in ("bos_token_id", "eos_token_id"):
        config.pop(key, None)
    path = ws.case_dir / "huge.json"
    path.write_text(json.dumps(config))
    out = ws.fresh_out()
    return Run(["init", "--config", str(path), "--out", str(out)], ["parameters", "GiB", "memory"], preserve=[path],
               absent=[out / "model.safetensors"])


@case("train_data_dev_zero")
def _(ws):
    m = ws.model()
    out = ws.fresh_out()
    return Run(train(ws, m, data=Path("/dev/zero"), out=out), ["/dev/zero", "character device"],
               preserve=[m, ws.corpus], absent=[out])


@case("train_data_fifo")
def _(ws):
    m = ws.model()
    fifo = ws.case_dir / "corpus.fifo"
    os.mkfifo(fifo)
    return Run(train(ws, m, data=fifo), ["corpus.fifo", "FIFO (named pipe)"], preserve=[m])


# A model file replaced by something that is not a file: named for what it is, never read
# (a FIFO would wait for a writer).
for name, file, command, make, what in (
        ("config_json_is_a_directory", "config.json", score, Path.mkdir, "is a directory"),
        ("tokenizer_is_a_directory", "flotilla_tokenizer.json", generate, Path.mkdir, "is a directory"),
        ("tokenizer_is_a_fifo", "flotilla_tokenizer.json", generate, os.mkfifo, "FIFO (named pipe)")):
    @case(name)
    def _(ws, file=file, command=command, make=make, what=what):
        m = ws.model()
        (m / file).unlink()
        make(m / file)
        return Run(command(m), [file, what], preserve=[m])


@case("tokenizer_vocabulary_larger_than_the_model")
def _(ws):
    m = ws.model()
    shrink_vocab(m, 200)
    return Run(generate(m), ["tokenizer", "200", "vocab"], preserve=[m])


@case("train_prepared_shard_corrupted")
def _(ws):
    m = ws.model()
    data = prepared_data(ws, m)
    shard = data / "train-00000.fltk"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01  # one loss-mask bit: structurally valid, only the checksum sees it
    shard.write_bytes(bytes(raw))
    out = ws.fresh_out()
    return Run(train(ws, m, data=data, out=out), ["train-00000.fltk", "CRC-32C", "data prepare"],
               preserve=[m, data], absent=[out])


@case("control_train_prepared_without_checksums")
def _(ws):
    # Folders prepared before shards had checksums still train.
    m = ws.model()
    data = prepared_data(ws, m)
    def drop(index):
        for split in index["splits"].values():
            for shard in split["shards"]:
                shard.pop("crc32c", None)
    edit_json(data / "index.json", drop)
    out = ws.fresh_out()
    return Run(train(ws, m, data=data, out=out), kind="control", preserve=[m, data],
               creates=[out / "model.safetensors"])


# 18.7: safetensors the format forbids; non-finite weights

@case("safetensors_duplicate_tensor_name")
def _(ws):
    m = ws.model()
    p = m / "model.safetensors"
    header, data = read_safetensors(p)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps({name: header[name]}, separators=(",", ":"))[1:-1]
    text = text[:-1] + "," + entry + "}"  # the same name again, last
    raw = text.encode()
    raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return Run(score(m), ["model.safetensors", name, "twice"], preserve=[m])


@case("safetensors_overlapping_tensors")
def _(ws):
    m = ws.model()
    # Two tensors of one size, the first two layers' norms: the second aliases the first's bytes.
    def edit_norms(h, d):
        norms = [k for k in h if k.endswith("input_layernorm.weight")]
        h[norms[1]]["data_offsets"] = list(h[norms[0]]["data_offsets"])
    edit_safetensors(m / "model.safetensors", edit_norms)
    return Run(score(m), ["model.safetensors", "overlap tensor"], preserve=[m])


@case("safetensors_trailing_bytes")
def _(ws):
    m = ws.model()
    with open(m / "model.safetensors", "ab") as f:
        f.write(b"appended garbage")
    return Run(score(m), ["model.safetensors", "trailing bytes"], preserve=[m])


@case("control_non_finite_weight_warns")
def _(ws):
    m = ws.model()
    poison_weight(m, "model.norm.weight", float("nan"))
    return Run(score(m), ["model.norm.weight", "non-finite", "--strict"], kind="control", preserve=[m])


@case("non_finite_weight_strict")
def _(ws):
    m = ws.model()
    poison_weight(m, "model.layers.0.mlp.up_proj.weight", float("inf"))
    return Run(score(m) + ["--strict"], ["model.layers.0.mlp.up_proj.weight", "non-finite", "inf"], preserve=[m])


@case("train_non_finite_weight_strict")
def _(ws):
    m = ws.model()
    poison_weight(m, "model.norm.weight", float("-inf"))
    out = ws.fresh_out()
    return Run(train(ws, m, out=out) + ["--strict"], ["model.norm.weight", "non-finite"], preserve=[m, ws.corpus],
               absent=[out])


# -- quantized models and convert: bad_input_quant.py
from bad_input_quant import register_quant_cases  # noqa: E402  (next to this file)
register_quant_cases(case, Run, (score, generate, train, edit_json, edit_safetensors))
# -- LoRA adapters for another model, broken adapter files, fuse: bad_input_adapters.py
from bad_input_adapters import register_adapter_cases  # noqa: E402
register_adapter_cases(case, Run, (score, generate, train, edit_json, edit_safetensors))
# -- flags outside their domain, loops over data that must end: bad_input_limits.py
from bad_input_limits import register_limit_cases  # noqa: E402
register_limit_cases(case, Run, (score, generate, train, edit_json, edit_safetensors))


# ---- Running and checking ------------------------------------------------------------------

@dataclass
class Outcome:
    name: str
    status: str  # PASS, FAIL, XFAIL, XPASS
    returncode: Optional[int]
    seconds: float
    line: str
    problems: List[str]
    stderr: str


def needle_present(needle: Needle, text: str) -> bool:
    alternatives = needle if isinstance(needle, tuple) else (needle,)
    return any(a.lower() in text.lower() for a in alternatives)


def check(run: Run, returncode: Optional[int], timed_out: bool, stdout: str, stderr: str,
          before: Dict[Path, Dict[str, bytes]]) -> Tuple[str, List[str]]:
    """(the line to show, the problems found)."""
    problems: List[str] = []
    lines = [l for l in stderr.splitlines() if l.strip()]
    shown = lines[0] if len(lines) == 1 else (" / ".join(lines[:2]) if lines else "(no stderr)")

    if timed_out:
        problems.append(f"no exit within {CASE_TIMEOUT_S:.0f}s (hang)")
    elif returncode is None or returncode < 0:
        problems.append(f"killed by signal {-returncode if returncode else '?'}")
    elif run.kind == "control":
        if returncode != 0:
            problems.append(f"exit {returncode} on valid input")
    elif returncode == 0:
        problems.append("exit 0 on bad input")
    elif returncode >= 128:
        problems.append(f"exit {returncode}: looks like a signal (128+{returncode - 128})")
    elif run.kind == "error" and run.exit_code is not None and returncode != run.exit_code:
        problems.append(f"exit {returncode}, expected {run.exit_code} (bad input is an InputError)")

    for marker in CRASH_MARKERS:
        if marker in stderr or marker in stdout:
            problems.append(f"crash or sanitizer marker {marker!r} in the output")
    for tag in INTERNAL_TAGS:
        if tag in stderr:
            problems.append(f"a library's internal tag {tag!r} reaches the user")

    if run.kind == "error":
        if len(lines) != 1:
            problems.append(f"stderr has {len(lines)} non-empty lines, expected exactly one")
        if not lines or not lines[0].startswith(ERROR_PREFIX):
            problems.append(f"stderr does not start with {ERROR_PREFIX!r}")
    elif run.kind == "cli11" and not lines:
        problems.append("no message on stderr")
    # For a control, the needles are what a warning on stderr must name.
    for needle in run.needles:
        if not needle_present(needle, stderr):
            problems.append(f"the message does not name {needle!r}")

    for path in run.creates:
        if not path.is_file():
            problems.append(f"{path.name} was not written")
    for path in run.absent:
        if path.exists():
            problems.append(f"{path.name} was created")

    for path, files in before.items():
        after = snapshot(path)
        if after != files:
            changed = sorted(k for k in set(files) | set(after) if files.get(k) != after.get(k))
            problems.append(f"{path.name}: user files changed or lost: {', '.join(changed)}")
    return shown, problems


def run_case(ws: Workspace, name: str, make: CaseFn, env: Dict[str, str]) -> Outcome:
    ws.begin(name)
    run = make(ws)
    before = {p: snapshot(p) for p in run.preserve}
    start = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.run([ws.flotilla, *run.argv], cwd=ws.case_dir, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=CASE_TIMEOUT_S)
        returncode, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed the child
        timed_out, returncode, out, err = True, None, e.stdout or b"", e.stderr or b""
    seconds = time.monotonic() - start
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    shown, problems = check(run, returncode, timed_out, stdout, stderr, before)

    if name in EXPECTED_FAIL:
        status = "XFAIL" if problems else "XPASS"
        if not problems:
            problems = [f"passes now: remove {name!r} from EXPECTED_FAIL ({EXPECTED_FAIL[name]})"]
    else:
        status = "FAIL" if problems else "PASS"
    return Outcome(name, status, returncode, seconds, shown, problems, stderr)


def make_valid_model(ws: Workspace, env: Dict[str, str]) -> None:
    proc = subprocess.run([ws.flotilla, "init", "--preset", "tiny", "--seed", "1", "--out", str(ws.valid_model)],
                          env=env, capture_output=True, timeout=120)
    if proc.returncode != 0:
        sys.exit(f"flotilla init --preset tiny failed (exit {proc.returncode}):\n"
                 f"{proc.stderr.decode('utf-8', 'replace')}")
    ws.corpus.write_text(corpus_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flotilla", help="path to the flotilla binary")
    parser.add_argument("-k", dest="select", default="", help="run only cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory and print its path")
    args = parser.parse_args()

    flotilla = os.path.abspath(args.flotilla)
    if not os.access(flotilla, os.X_OK):
        sys.exit(f"not an executable: {flotilla}")
    env = dict(os.environ)
    env.update(SANITIZER_ENV)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")

    unknown = sorted(set(EXPECTED_FAIL) - {name for name, _ in CASES})
    if unknown:
        sys.exit(f"EXPECTED_FAIL names cases that do not exist: {', '.join(unknown)}")

    root = Path(tempfile.mkdtemp(prefix="flotilla-bad-input-"))
    outcomes: List[Outcome] = []
    try:
        ws = Workspace(root, flotilla)
        make_valid_model(ws, env)
        for name, make in CASES:
            if args.select in name:
                outcomes.append(run_case(ws, name, make, env))
    finally:
        if args.keep:
            print(f"cases kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    width = max(len(o.name) for o in outcomes) if outcomes else 10
    print(f"flotilla bad-input cases: {flotilla}")
    print(f"{'result':6} {'case':{width}} {'exit':>4} {'time':>6}  stderr")
    for o in outcomes:
        rc = "hang" if o.returncode is None else str(o.returncode)
        print(f"{o.status:6} {o.name:{width}} {rc:>4} {o.seconds:5.2f}s  {o.line}")
        for p in o.problems:
            print(f"{'':6} {'':{width}}   - {p}")
        if o.status in ("FAIL", "XPASS") and o.stderr.count("\n") > 1:
            tail = "\n".join(o.stderr.splitlines()[-15:])
            print("\n".join(f"{'':10}| {l}" for l in tail.splitlines()))

    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "XFAIL", "XPASS")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(outcomes)} cases")
    if not outcomes:
        print("no case matched")
        return 1
    return 1 if counts["FAIL"] or counts["XPASS"] else 0


if __name__ == "__main__":
    sys.exit(main())
