"""Where a completion of a dedented function prompt ends: the cut distillation trains EOS after."""

from __future__ import annotations

from training.completions import (
    coverage,
    cut_at_function_end,
    function_end,
    function_prompts,
    parses,
    starts_validly,
)
from training.corpus import SourceFile

PROMPT = 'def f(x):\n    """Doc."""\n    y = x\n'


def test_the_function_ends_at_the_first_line_back_at_the_margin():
    text = PROMPT + "    if y:\n\n        return y\n    return 0\n\n\n@cache\ndef g():\n"
    assert text[function_end(text, len(PROMPT)):].startswith("@cache")
    # Blank and indented lines, however many, do not end it; the prompt's own margin line does not count.
    assert function_end(PROMPT + "    return y\n\n    \n", len(PROMPT)) is None
    # A completion that continues the prompt's last line mid-way (token healing) is still judged by lines.
    healed = "def f(x):\n    return x +"
    text = healed + " 1\nclass A:\n"
    assert text[function_end(text, len(healed)):] == "class A:\n"


def test_the_cut_falls_on_a_token_boundary_and_keeps_the_last_newline():
    # One character per token: a decode that joins them.
    def decode(ids):
        return "".join(chr(i) for i in ids)

    prompt = [ord(c) for c in PROMPT]
    completion = [ord(c) for c in "    return y\n\ndef g(): pass\n"]
    assert decode(cut_at_function_end(decode, prompt, completion)) == "    return y\n\n"
    unfinished = [ord(c) for c in "    return y\n"]
    assert cut_at_function_end(decode, prompt, unfinished) == unfinished
    # A token that straddles the margin ("\ndef") is left out with what follows it.
    words = ["    return y", "\ndef", " g"]
    vocabulary = {i: w for i, w in enumerate(words, start=1000)}

    def decode_words(ids):
        return "".join(vocabulary.get(i, chr(i)) for i in ids)

    assert cut_at_function_end(decode_words, prompt, [1000, 1001, 1002]) == [1000]


def test_a_prompt_carries_the_rest_of_its_function_and_coverage_shows_an_early_end():
    source = SourceFile("mod.py", "class A:\n    def f(self, x):\n        \"\"\"Doc.\"\"\"\n        y = x\n"
                        "        z = y\n        return z\n\n    def g(self):\n        pass\n")
    (prompt,) = function_prompts([source], limit=10)
    assert prompt.prompt == 'def f(self, x):\n    """Doc."""\n    y = x\n    z = y\n'
    assert prompt.body == "    return z\n"  # at the prompt's margin, so prompt + body is the function
    # Written tokens against the body's, capped by the budget: ending at a quarter of the body shows.
    assert coverage(10, body_tokens=40, budget=128) == 0.25
    assert coverage(128, body_tokens=400, budget=128) == 1.0
    assert coverage(50, body_tokens=20, budget=128) == 1.0  # writing on past the end is not counted here


def test_a_body_cut_inside_a_bracket_or_before_a_blocks_body_starts_validly_but_does_not_parse():
    prompt = 'def area(w, h):\n    """Width times height."""\n'
    for cut in ("    return (w *\n", "    if w < 0:\n", "    total = [w,\n             h,\n"):
        assert starts_validly(prompt, cut) and not parses(prompt, cut), cut
    for broken in ("    return )\n", "    x = = 1\n", "    return w\n  h\n"):
        assert not starts_validly(prompt, broken), broken
    assert starts_validly(prompt, "    return w * h\n") and parses(prompt, "    return w * h\n")
    assert not starts_validly(prompt, "    return w") and not starts_validly(prompt, "\n\n")  # no complete line
