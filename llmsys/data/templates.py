"""Chat templates: a conversation -> token ids, the flags of the tokens SFT trains, and the end-of-turn token.

**Built-in ChatML**, one turn per message::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

Every piece is tokenized on its own and contents never parse special tokens, so a user writing
"<|im_end|>" gets plain text, not an end-of-turn. The trained tokens are the assistant contents and
the ``<|im_end|>`` closing each assistant turn (so the model learns to stop); the system and user
turns, every ``<|im_start|>assistant\\n`` header and the newline after ``<|im_end|>`` are not.

**A tokenizer's own Jinja template** (tokenizer_config.json, selected by ``data.chat_template=auto``)
is rendered through `transformers`: the assistant span is the text that turn ``i`` adds beyond the
prompt of turns ``< i`` with the generation prompt, trained up to and including its last special
token. (That path tokenizes the rendered text with special tokens parsed, so it cannot guard against
template tokens typed inside user text; the built-in path can.)

**End of turn.** Each template names the token that closes an assistant turn (``end_of_turn`` /
``end_of_turn_id``): ChatML's ``<|im_end|>``, and for a tokenizer's own template the tokenizer's EOS
token. It is the one rule for where an answer stops: what SFT trains the model to emit, what
generation stops on (PPO rollouts) and what the probes count as a proper stop.
"""
from __future__ import annotations

from llmsys.data.conversations import ROLES, Messages
from llmsys.data.sources import DataError
from llmsys.data.tokenizer import IM_END_TOKEN, IM_START_TOKEN, Tokenizer


class ChatMLTemplate:
    """The built-in template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""

    name = "chatml"
    end_of_turn = IM_END_TOKEN

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {token: tokenizer.token_to_id(token) for token in (IM_START_TOKEN, IM_END_TOKEN)}
        missing = [token for token, token_id in ids.items() if token_id is None]
        if missing:
            raise DataError(f"tokenizer has no {', '.join(missing)} token; the built-in ChatML template needs "
                            f"{IM_START_TOKEN} and {IM_END_TOKEN} (llmsys's BPE has them)")
        self.tokenizer = tokenizer
        self.im_start = ids[IM_START_TOKEN]
        self.im_end = ids[IM_END_TOKEN]
        self.newline = tokenizer.encode("\n")
        self.headers = {role: [self.im_start] + tokenizer.encode(f"{role}\n") for role in ROLES}

    @property
    def end_of_turn_id(self) -> int:
        """``<|im_end|>``: closes every turn, and the assistant's is trained."""
        return self.im_end

    def encode(self, messages: Messages) -> tuple[list[int], list[int]]:
        """Token ids and per-token target flags (1 = trained) of a whole conversation."""
        ids: list[int] = []
        targets: list[int] = []
        for message in messages:
            content = self.tokenizer.encode(message["content"])  # never parses special tokens
            trained = int(message["role"] == "assistant")
            header = self.headers[message["role"]]
            ids += header + content + [self.end_of_turn_id] + self.newline
            targets += [0] * len(header) + [trained] * (len(content) + 1) + [0] * len(self.newline)
        return ids, targets

    def generation_prompt(self, messages: Messages) -> list[int]:
        """The prompt for generating the next assistant turn: the turns, then the assistant header."""
        ids: list[int] = []
        for message in messages:
            ids += self.headers[message["role"]] + self.tokenizer.encode(message["content"]) + [self.end_of_turn_id]
            ids += self.newline
        return ids + self.headers["assistant"]


class HFChatTemplate:
    """A tokenizer's own Jinja chat template, rendered by `transformers` (see the module docstring)."""

    name = "hf"

    def __init__(self, tokenizer: Tokenizer, template: str) -> None:
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise DataError("the tokenizer has its own chat_template (tokenizer_config.json), which needs "
                            "`transformers` to render; install it, or set data.chat_template=chatml to use "
                            "the built-in template") from None
        self.tokenizer = tokenizer
        self.template = template
        self._hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token,
                                           bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token)
        self._special = {token_id for token_id in tokenizer.backend.get_added_tokens_decoder()}

    @property
    def end_of_turn(self) -> str:
        """The tokenizer's EOS token: such templates (Zephyr, Llama 2) close a turn with ``eos_token``."""
        return self.tokenizer.eos_token

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.eos_id

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return self._hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def encode(self, messages: Messages) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        targets: list[int] = []
        done = ""  # rendered text already turned into ids
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            full = self._render(messages[:index + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError("the tokenizer's chat_template does not render conversations as growing "
                                "prefixes, so the assistant tokens cannot be located; set "
                                "data.chat_template=chatml")
            context = self.tokenizer.encode(prompt[len(done):], allow_special_tokens=True)
            answer = self.tokenizer.encode(full[len(prompt):], allow_special_tokens=True)
            last_special = max((i for i, t in enumerate(answer) if t in self._special), default=len(answer) - 1)
            ids += context + answer
            targets += [0] * len(context) + [1] * (last_special + 1) + [0] * (len(answer) - last_special - 1)
            done = full
        rest = self._render(messages, add_generation_prompt=False)[len(done):]
        tail = self.tokenizer.encode(rest, allow_special_tokens=True) if rest else []
        return ids + tail, targets + [0] * len(tail)

    def generation_prompt(self, messages: Messages) -> list[int]:
        return self.tokenizer.encode(self._render(messages, add_generation_prompt=True), allow_special_tokens=True)


def chat_template_for(tokenizer: Tokenizer, choice: str = "auto") -> ChatMLTemplate | HFChatTemplate:
    """The template ``data.chat_template`` selects for ``tokenizer``."""
    own = tokenizer.hf_config().get("chat_template")
    if choice == "auto" and isinstance(own, str) and own.strip():
        return HFChatTemplate(tokenizer, own)
    return ChatMLTemplate(tokenizer)
