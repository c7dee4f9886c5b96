"""The two-turn prompt layout, as token ids (the instructions' text: score_ray.instructions).

Turn 1 is the problem rendered through the tokenizer's chat template. Turn 2 is
built from the token ids that were *sampled* in turn 1 plus the ids of the
chat-template text that closes the assistant turn and opens a user turn with the
self-correction instruction. A turn's text is never re-tokenised: re-encoding
sampled text can give different ids than were sampled, and the learner would
then score tokens the policy never produced.

Imports no torch: only a tokenizer object with ``apply_chat_template`` and
``encode`` is needed.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from score_ray.config import PromptsConfig

_PLACEHOLDER = "\x00SCORE_RAY_ASSISTANT\x00"


class TwoTurnPrompter:
    """Renders turn-1 prompt ids and assembles turn-2 prompt ids from sampled turn-1 ids.

    The chat-template pieces around an assistant message are found once, by
    rendering a conversation with a placeholder assistant message and cutting
    around it; they are tokenised once and reused for every episode.
    """

    def __init__(self, tokenizer: Any, prompts: Optional[PromptsConfig] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "SCoRe's two turns are rendered through it (use an instruct/chat model)"
            )
        self.tokenizer = tokenizer
        self.prompts = prompts if prompts is not None else PromptsConfig()
        self.eos_token_id = tokenizer.eos_token_id
        self._turn2_suffix: dict[str, list[int]] = {}
        self._assistant_close_text = self._find_assistant_close()

    def _first_turn_text(self, kind: str, problem: str) -> str:
        prompts = self.prompts
        if kind == "math":
            return prompts.math_user_template.format(instruction=prompts.math_first_turn, problem=problem)
        if kind == "code":
            return prompts.code_user_template.format(instruction=prompts.code_first_turn, problem=problem)
        raise ValueError(f"unknown problem kind {kind!r} (expected 'math' or 'code')")

    def _self_correction_text(self, kind: str) -> str:
        if kind == "math":
            return self.prompts.math_self_correction
        if kind == "code":
            return self.prompts.code_self_correction
        raise ValueError(f"unknown problem kind {kind!r} (expected 'math' or 'code')")

    # ---- turn 1
    def _messages(self, user_text: str, fewshot: Sequence[tuple[str, str]] = (), kind: str = "math") -> list[dict[str, str]]:
        messages = []
        if self.prompts.system_prompt is not None:
            messages.append({"role": "system", "content": self.prompts.system_prompt})
        for shot_problem, shot_solution in fewshot:  # k-shot examples as earlier chat turns
            messages.append({"role": "user", "content": self._first_turn_text(kind, shot_problem)})
            answer = f"```python\n{shot_solution.strip()}\n```" if kind == "code" else shot_solution
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": user_text})
        return messages

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        # The chat template already wrote any BOS; never let the tokenizer add another.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def turn1_text(self, problem: Any) -> str:
        """The rendered first-turn prompt of a Problem (anything with kind, prompt and fewshot)."""
        user = self._first_turn_text(problem.kind, problem.prompt)
        return self._render(self._messages(user, getattr(problem, "fewshot", ()), problem.kind), True)

    def turn1_ids(self, problem: Any) -> list[int]:
        return self._encode(self.turn1_text(problem))

    # ---- turn 2
    def _find_assistant_close(self) -> str:
        """The template text that follows an assistant message's content (e.g. '<|im_end|>\\n')."""
        messages = self._messages("x") + [{"role": "assistant", "content": _PLACEHOLDER}]
        text = self._render(messages, False)
        if _PLACEHOLDER not in text:
            raise ValueError("the chat template drops assistant content; cannot build the second turn")
        return text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]

    def _suffix_ids(self, kind: str) -> list[int]:
        """Ids of the text between the end of turn 1's assistant message and turn 2's generation start."""
        if kind not in self._turn2_suffix:
            history = self._messages("x") + [{"role": "assistant", "content": _PLACEHOLDER}]
            closed = self._render(history, False)
            opened = self._render(history + [{"role": "user", "content": self._self_correction_text(kind)}], True)
            if not opened.startswith(closed):
                raise ValueError("the chat template rewrites earlier turns when a turn is added; cannot append turn 2")
            self._turn2_suffix[kind] = self._encode(opened[len(closed) :])
        return self._turn2_suffix[kind]

    def close_ids(self, turn1_response_ids: Sequence[int]) -> list[int]:
        """Ids that close the assistant turn after the sampled response.

        If the sampler stopped on EOS, that sampled id already stands for the
        template's end-of-turn token; only what follows it (e.g. a newline) is added.
        A response cut at the token budget gets the whole closing text.
        """
        close = self._assistant_close_text
        ends_with_eos = len(turn1_response_ids) > 0 and turn1_response_ids[-1] == self.eos_token_id
        eos_text = self.tokenizer.convert_ids_to_tokens(self.eos_token_id) if self.eos_token_id is not None else None
        if ends_with_eos and eos_text and close.startswith(eos_text):
            close = close[len(eos_text) :]
        return self._encode(close) if close else []

    def turn2_ids(self, kind: str, turn1_prompt_ids: Sequence[int], turn1_response_ids: Sequence[int]) -> list[int]:
        """x2 = x1 + y1 (sampled ids, untouched) + close of turn 1 + self-correction user turn + generation prompt."""
        return (
            list(turn1_prompt_ids) + list(turn1_response_ids) + self.close_ids(turn1_response_ids) + self._suffix_ids(kind)
        )
