#!/usr/bin/python3
"""Trains small BPE tokenizers on a text corpus and writes them as Hugging Face
tokenizer.json files (the exact schema of the `tokenizers` library), one folder each:

  byte_llama3/      byte-level BPE, Llama 3 layout: Split(Llama 3 regex) + ByteLevel,
                    ignore_merges, merges as "a b" strings, <|begin_of_text|> template,
                    tokenizer_config.json with bos/eos
  byte_qwen2/       the same with the Qwen2 split regex (one digit per piece), the NFC
                    normalizer, no BOS
  byte_gpt2/        GPT-2 layout: ByteLevel(add_prefix_space false) pre-tokenizer, merges
                    as [a, b] pairs, <|endoftext|>, no tokenizer_config.json
  byte_gpt2_prefix/ the same with add_prefix_space true
  sp_llama2/        SentencePiece-style BPE, Llama 2 layout: normalizer Prepend("▁") +
                    Replace(" ", "▁"), byte_fallback, <unk>/<s>/</s>, fuse_unk, decoder
                    Replace + ByteFallback + Fuse + Strip
  sp_metaspace/     the same model with the Metaspace pre-tokenizer (prepend_scheme first,
                    split false) and the Metaspace decoder (Mistral / newer Llama 2 files)

Each also has a non-special added token, "[[flotilla]]", to check added tokens that are not
special. Training is plain BPE over word counts (most frequent pair first, ties broken by
the pair's text so the output is the same on every machine); stdlib only.

Usage: make_tokenizers.py --corpus data/sample/corpus.txt --out DIR [--byte-merges N]
       [--sp-merges N]
"""

import argparse
import collections
import json
import os
import re

# Python's re has no \p{L}; this approximates the GPT-2 split for training purposes only
# (the split used at encode time is the tokenizer's own).
WORD_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SP_SPACE = "\u2581"
EXTRA_TOKEN = "[[flotilla]]"


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, in GPT-2's order."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs))), bs


def train_bpe(word_counts, num_merges):
    """word_counts: {tuple of symbols: count}. Returns the merges, best first."""
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    pair_counts = collections.Counter()
    where = collections.defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    merges = []
    while len(merges) < num_merges and pair_counts:
        best, best_count = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        if best_count < 2:
            break
        merges.append(best)
        a, b = best
        for i in sorted(where.pop(best, ())):
            w, c = words[i], counts[i]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= c
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += c
                where[pair].add(i)
    return merges


def added_token(token_id, content, special, normalized=None):
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": (not special) if normalized is None else normalized,
            "special": special}


def template(bos, bos_id):
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def bpe_model(vocab, merges, as_pairs, **options):
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": False}
    model.update(options)
    model["vocab"] = vocab
    model["merges"] = [[a, b] for a, b in merges] if as_pairs else [f"{a} {b}" for a, b in merges]
    return model


def write(out_dir, name, tokenizer, config):
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=2)
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)


def byte_level_tokenizers(corpus, num_merges, out_dir):
    byte_map, order = bytes_to_unicode()
    counts = collections.Counter(WORD_RE.findall(corpus))
    word_counts = collections.Counter()
    for word, c in counts.items():
        word_counts[tuple(byte_map[b] for b in word.encode("utf-8"))] += c
    merges = train_bpe(word_counts, num_merges)
    vocab = {}
    for b in order:
        vocab[byte_map[b]] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    n = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}

    def split_then_bytes(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}

    # Llama 3: ids of the added tokens follow the vocabulary.
    added = [added_token(n, "<|begin_of_text|>", True), added_token(n + 1, "<|end_of_text|>", True),
             added_token(n + 2, "<|eot_id|>", True), added_token(n + 3, EXTRA_TOKEN, False, normalized=False)]
    write(out_dir, "byte_llama3", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": split_then_bytes(LLAMA3_REGEX),
        "post_processor": {"type": "Sequence", "processors": [
            dict(byte_level, add_prefix_space=True, trim_offsets=False),
            template("<|begin_of_text|>", n)]},
        "decoder": byte_level,
        "model": bpe_model(vocab, merges, as_pairs=False, ignore_merges=True),
    }, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"})

    added = [added_token(n, "<|endoftext|>", True), added_token(n + 1, "<|im_start|>", True),
             added_token(n + 2, "<|im_end|>", True), added_token(n + 3, EXTRA_TOKEN, False)]
    write(out_dir, "byte_qwen2", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"}, "pre_tokenizer": split_then_bytes(QWEN2_REGEX),
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": bpe_model(vocab, merges, as_pairs=True),
    }, {"add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "errors": "replace", "tokenizer_class": "Qwen2Tokenizer"})

    added = [added_token(n, "<|endoftext|>", True), added_token(n + 1, EXTRA_TOKEN, False)]
    for name, prefix in (("byte_gpt2", False), ("byte_gpt2_prefix", True)):
        write(out_dir, name, {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": dict(byte_level, add_prefix_space=prefix),
            "post_processor": dict(byte_level, add_prefix_space=True),
            "decoder": dict(byte_level, add_prefix_space=True),
            "model": bpe_model(vocab, merges, as_pairs=True),
        }, None)


def sentencepiece_tokenizers(corpus, num_merges, out_dir):
    words = collections.Counter()
    chars = collections.Counter()
    for paragraph in corpus.split("\n\n"):
        text = SP_SPACE + paragraph.replace(" ", SP_SPACE)
        chars.update(text)
        # SentencePiece never merges across a space: a word is "▁" and what follows it.
        words.update(re.findall(SP_SPACE + "[^" + SP_SPACE + "]*|[^" + SP_SPACE + "]+", text))
    alphabet = sorted((c for c, k in chars.items() if k >= 2), key=lambda c: (-chars[c], c))
    word_counts = collections.Counter()
    for w, c in words.items():
        if all(ch in alphabet for ch in w):
            word_counts[tuple(w)] += c
    merges = train_bpe(word_counts, num_merges)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [added_token(0, "<unk>", True), added_token(1, "<s>", True), added_token(2, "</s>", True),
             added_token(len(vocab), EXTRA_TOKEN, False)]
    model = bpe_model(vocab, merges, as_pairs=False, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    config = {"add_bos_token": True, "add_eos_token": False,
              "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False},
              "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False},
              "unk_token": "<unk>", "pad_token": None, "legacy": False, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "LlamaTokenizer"}
    write(out_dir, "sp_llama2", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SP_SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SP_SPACE}]},
        "pre_tokenizer": None,
        "post_processor": template("<s>", 1),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SP_SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": model,
    }, config)
    metaspace = {"type": "Metaspace", "replacement": SP_SPACE, "prepend_scheme": "first", "split": False}
    write(out_dir, "sp_metaspace", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": metaspace,
        "post_processor": template("<s>", 1),
        "decoder": metaspace,
        "model": model,
    }, config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--byte-merges", type=int, default=1500)
    parser.add_argument("--sp-merges", type=int, default=800)
    args = parser.parse_args()
    with open(args.corpus, encoding="utf-8") as f:
        corpus = f.read()
    byte_level_tokenizers(corpus, args.byte_merges, args.out)
    sentencepiece_tokenizers(corpus, args.sp_merges, args.out)


if __name__ == "__main__":
    main()
