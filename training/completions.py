"""Held-out code-completion prompts and the checks applied to what the model writes.

A prompt is a held-out function's signature, docstring and first body lines, dedented to the left
margin. A completion *parses* when the prompt plus the completion's complete lines (text up to its
last newline) is valid Python and at least one of those lines is not blank: so an empty or
single-fragment answer does not count, and a body that goes on into a new function does.
"""

from __future__ import annotations

import ast
import codeop
import textwrap
import warnings
from dataclasses import dataclass

from .corpus import SourceFile

PROMPT_BODY_LINES = 2  # body lines after the docstring that go into the prompt


@dataclass(frozen=True)
class CompletionPrompt:
    source: str  # "file.py:line"
    prompt: str
    body: str = ""  # the rest of the function after the prompt, as the file has it (same margin)


def function_prompts(files: list[SourceFile], *, limit: int) -> list[CompletionPrompt]:
    """Up to ``limit`` prompts, spread evenly over all eligible functions (deterministic)."""
    prompts = [p for source in files for p in _prompts_in(source)]
    if len(prompts) <= limit:
        return prompts
    stride = len(prompts) / limit
    return [prompts[int(i * stride)] for i in range(limit)]


def _prompts_in(source: SourceFile) -> list[CompletionPrompt]:
    try:
        tree = ast.parse(source.text)
    except SyntaxError:
        return []
    lines = source.text.splitlines(keepends=True)
    prompts = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        if len(node.body) < 3:  # a docstring and at least two statements
            continue
        docstring_end, function_end = node.body[0].end_lineno, node.end_lineno
        if docstring_end is None or function_end is None:  # ast.parse always sets them
            continue
        end = docstring_end + PROMPT_BODY_LINES  # 1-based, inclusive
        if end >= function_end:
            continue  # the prompt would hold the whole function
        text = textwrap.dedent("".join(lines[node.lineno - 1 : end]))
        whole = textwrap.dedent("".join(lines[node.lineno - 1 : function_end]))
        rest = whole[len(text):] if whole.startswith(text) else ""  # "" where a string is less indented
        prompts.append(CompletionPrompt(f"{source.name}:{node.lineno}", text, rest))
    return sorted(prompts, key=lambda p: p.source)


def complete_lines(completion: str) -> str:
    return completion[: completion.rfind("\n") + 1] if "\n" in completion else ""


def parses(prompt: str, completion: str) -> bool:
    kept = complete_lines(completion)
    if not kept.strip():
        return False
    try:
        ast.parse(prompt + kept)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
        return False
    return True


def starts_validly(prompt: str, completion: str) -> bool:
    """Whether the prompt plus the completion's complete lines is valid Python so far: it parses, or
    it is a valid start that more lines could finish (an open bracket, a block with no body yet).
    The test for a completion its token budget cut inside the function, which ``parses`` fails
    whenever the cut falls inside a bracket or before a block's body."""
    kept = complete_lines(completion)
    if not kept.strip():
        return False
    with warnings.catch_warnings():  # invalid escapes and the like warn, as the source would
        warnings.simplefilter("ignore")
        try:
            codeop.compile_command(prompt + kept, "<completion>", "exec")  # None: incomplete but valid so far
        except (SyntaxError, ValueError, OverflowError):
            return False
    return True


def coverage(written_tokens: int, body_tokens: int, budget: int) -> float:
    """How much of the real function's length a completion spans: written / min(body, budget), at most
    1. Parse share and distinct ratio both reward ending early (a two-line body parses and does not
    repeat), so a model that learnt to end functions too soon shows here."""
    expected = min(body_tokens, budget)
    return 1.0 if expected <= 0 else min(1.0, written_tokens / expected)


def distinct_ratio(token_ids: list[int]) -> float:
    """Distinct tokens / tokens: degenerate repetition ("a a a a") scores low."""
    return len(set(token_ids)) / len(token_ids) if token_ids else 0.0


def function_end(text: str, start: int) -> int | None:
    """Offset in ``text`` of the first non-blank line at the left margin that begins at or after
    ``start``: the end of a dedented prompt's function (what the Codex stop sequences "\\ndef",
    "\\nclass", "\\nif", "\\n#" approximate), or None if the function goes on to the end."""
    position = text.find("\n", max(0, start - 1))
    while position != -1:
        line_start = position + 1
        if line_start < len(text) and line_start >= start and not text[line_start].isspace():
            return line_start
        position = text.find("\n", line_start)
    return None


def cut_at_function_end(decode, prompt_ids: list[int], completion_ids: list[int]) -> list[int]:
    """The completion tokens up to the end of the prompt's function (function_end), so a model trained
    on them followed by EOS learns to stop where the function does instead of writing on into code
    that nobody asked for (a small model's next function soon loops). ``decode`` turns ids into text.
    The cut falls on a token boundary at or before the margin line, so a token that would straddle
    it is left out with what follows."""
    prompt_length = len(decode(prompt_ids))
    end = function_end(decode(prompt_ids + completion_ids), prompt_length)
    if end is None:
        return completion_ids
    kept = 0
    while kept < len(completion_ids) and len(decode(prompt_ids + completion_ids[: kept + 1])) <= end:
        kept += 1
    return completion_ids[:kept]
