#!/usr/bin/python3
"""generate speaks the model's chat template: the prompt goes through tokenizer_config.json's
template (Jinja) by default, --ignore-chat-template sends raw text, --system-prompt adds a
system turn, --prompt - reads stdin, stdout holds only the answer unless --verbose; chat
keeps a conversation over stdin lines; and
score --adapter scores with a LoRA adapter applied.

Usage: chat_generate_test.py <path/to/flotilla>
"""
import json
import subprocess
import sys

import cli_helpers

FLOTILLA = sys.argv[1]
# Zephyr's template (HuggingFaceH4/zephyr-7b-beta): runs through the Jinja subset.
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def run(args, stdin=None, ok=True):
    p = subprocess.run([FLOTILLA, *args], input=stdin, capture_output=True, text=True, timeout=120)
    if ok and p.returncode != 0:
        sys.exit(f"FAIL: {args} exited {p.returncode}: {p.stderr}")
    return p


def main():
    check = cli_helpers.SoftChecks()
    with cli_helpers.temp_tiny_model(FLOTILLA, 3) as (root, model):
        cfg_path = model / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cfg["chat_template"] = ZEPHYR
        cfg["eos_token"] = "</s>"
        cfg_path.write_text(json.dumps(cfg))
        gen = ["generate", "--model", str(model), "--max-tokens", "4"]

        v = run(gen + ["--prompt", "Hi there", "--system-prompt", "Be brief.", "--verbose"])
        check(v.stdout.startswith("<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"),
              f"--verbose prints the templated prompt first: {v.stdout[:80]!r}")
        check("tokens/s" in v.stderr, "--verbose reports the speed on stderr")

        q = run(gen + ["--prompt", "Hi there"])
        check("Hi there" not in q.stdout and "<|user|>" not in q.stdout, f"stdout holds only the answer: {q.stdout!r}")
        check(q.stderr == "", f"nothing on stderr without --verbose: {q.stderr!r}")

        raw = run(gen + ["--prompt", "Hi there", "--ignore-chat-template", "--verbose"])
        check(raw.stdout.startswith("Hi there") and "<|user|>" not in raw.stdout,
              f"--ignore-chat-template sends raw text: {raw.stdout[:40]!r}")

        piped = run(gen + ["--prompt", "-", "--verbose"], stdin="from a pipe")
        check("<|user|>\nfrom a pipe</s>" in piped.stdout, f"--prompt - reads stdin: {piped.stdout[:60]!r}")

        bad = run(gen + ["--prompt", "x", "--ignore-chat-template", "--system-prompt", "s"], ok=False)
        check(bad.returncode == 2 and "--system-prompt" in bad.stderr, "--system-prompt without a template is refused")

        # chat: each stdin line a turn; the answer joins the conversation, which the next turn
        # sends whole. Greedy, so turn 1 is generate's answer to the same prompt, and turn 2 is
        # generate's answer to the whole conversation rendered by hand as raw text.
        first = run(gen + ["--prompt", "Hi there", "--system-prompt", "Be brief."]).stdout
        answer1 = first[:-1] if first.endswith("\n") else first
        convo = ("<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n" + answer1 +
                 "</s>\n<|user|>\nAnd then?</s>\n<|assistant|>\n")
        second = run(gen + ["--prompt", "-", "--ignore-chat-template", "--no-bos", "--stop", "</s>"], stdin=convo).stdout
        chat = run(["chat", "--model", str(model), "--max-tokens", "4", "--system-prompt", "Be brief."],
                   stdin="Hi there\n\nAnd then?\n")
        check(chat.stdout == first + second,
              f"chat keeps the conversation: {chat.stdout!r} vs {first + second!r}")

        cfg["chat_template"] = "{% macro m() %}{% endmacro %}{{ messages }}"
        cfg_path.write_text(json.dumps(cfg))
        unsup = run(gen + ["--prompt", "x"], ok=False)
        check(unsup.returncode == 2 and "{% macro %}" in unsup.stderr and "tokenizer_config.json" in unsup.stderr,
              f"an unsupported template construct is named: {unsup.stderr.strip()}")

        del cfg["chat_template"]
        cfg_path.write_text(json.dumps(cfg))
        nochat = run(["chat", "--model", str(model)], stdin="hi\n", ok=False)
        check(nochat.returncode == 2 and "--chat-template" in nochat.stderr,
              f"chat without a template is refused, naming --chat-template: {nochat.stderr.strip()}")

        # score --adapter: a LoRA adapter trained one step changes the log-probabilities.
        (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
        out = root / "run"
        run(["train", "--model", str(model), "--data", str(root / "corpus.txt"), "--out", str(out), "--steps", "2",
             "--batch-size", "2", "--seq-len", "16", "--lr", "0.05", "--fine-tune-type", "lora"])
        score = ["score", "--model", str(model), "--text", "the quick brown fox"]
        base = json.loads(run(score).stdout)["total_logprob"]
        adapted = json.loads(run(score + ["--adapter", str(out)]).stdout)["total_logprob"]
        check(abs(base - adapted) > 1e-6, f"score --adapter applies the adapter ({base} vs {adapted})")

    check.exit()


if __name__ == "__main__":
    main()
