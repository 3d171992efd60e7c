"""``rega chat``: talk to a base model or a trained adapter.

    rega chat --adapter runs/rega/version_0/adapter --role medical

Each line read from stdin (a terminal or a pipe) is one user message. It is answered under the session's system
prompt — p_c by default (the model's own system prompt), ``--role DOMAIN`` for that domain's role prompt p_i,
``--system TEXT`` for any text — with the model's chat template (:class:`rega.data.chat.ChatFormat`, as in
training), after the earlier exchanges of the session; the answer is streamed to stdout as it is generated.
When a prompt would not leave room for ``max_new_tokens`` within ``max_context_tokens`` (and the model's own
``max_position_embeddings``), the oldest exchanges are dropped, then the middle of a message too long on its own is
cut (its head and tail kept), each said in one line. Greedy unless ``--decoding.do_sample true``.

Commands: ``/reset`` forgets the history, ``/system TEXT`` sets the system prompt, ``/role DOMAIN`` uses that
domain's role prompt, ``/help``, ``/exit`` (end of input ends the session too).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import torch
from transformers import TextStreamer

from rega.config import GREEDY, ModelConfig, SamplingConfig
from rega.data.prompts import PromptConfig
from rega.errors import ConfigError
from rega.modules.generation import decoding_kwargs, stop_token_ids
from rega.use.loading import LoadedModel, load_for_use, system_text, use_settings

CUT_MARK = "\n[...]\n"  # stands for the middle of a message too long for the context
HELP = "/reset forgets the history, /system TEXT sets the system prompt, /role DOMAIN uses a role prompt, /exit ends"


class _Printer(TextStreamer):
    """Writes the answer to ``out`` as words complete (TextStreamer holds back partial words and characters)."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def encode(loaded: LoadedModel, system: str, user: str, history: list[tuple[str, str]]) -> list[int]:
    # ChatFormat renders earlier exchanges segment by segment, exactly as training and evaluation do.
    return loaded.chat.encode_prompt(system, user, tuple(history))


@torch.inference_mode()
def stream_reply(loaded: LoadedModel, prompt_ids: list[int], sampling: SamplingConfig, out: TextIO) -> str:
    """Generate one answer, writing it to ``out`` token by token; returns it cut at the first end-of-turn.

    rega.modules.generation.generate_batch takes no streamer, hence this one-sequence ``generate`` call with
    the same decoding settings (:func:`rega.modules.generation.decoding_kwargs`).
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)
    kwargs = decoding_kwargs(sampling, stops, pad_id)
    attention = torch.ones_like(input_ids)
    output = model.generate(
        input_ids=input_ids, attention_mask=attention, streamer=_Printer(tokenizer, out), **kwargs
    )
    new = output[0, len(prompt_ids) :].tolist()
    cut = next((k for k, token in enumerate(new) if token in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


@dataclass
class ChatSession:
    """One conversation: the system prompt, the exchanges so far and how to answer."""

    loaded: LoadedModel
    system: str
    sampling: SamplingConfig
    prompts: PromptConfig | None = None
    max_context_tokens: int = 2048
    history: list[tuple[str, str]] = field(default_factory=list)

    def render(self, user: str) -> str:
        """The text the model continues for ``user`` after the history (what ``/system`` changes)."""
        return self.loaded.chat.prompt_text(self.system, user, tuple(self.history))

    def budget(self) -> int:
        """Prompt tokens a turn may send: the context (and the model's own limit) less the answer's room."""
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None) or self.max_context_tokens
        return min(self.max_context_tokens, limit) - self.sampling.max_new_tokens

    def prompt_ids(self, user: str, out: TextIO) -> tuple[list[int], str]:
        """(prompt ids, the message as sent): the oldest exchanges dropped, then the message cut, to fit."""
        dropped, budget = 0, self.budget()
        ids = encode(self.loaded, self.system, user, self.history)
        while self.history and len(ids) > budget:
            self.history.pop(0)
            dropped += 1
            ids = encode(self.loaded, self.system, user, self.history)
        if dropped:
            out.write(f"(dropped the {dropped} oldest exchange(s) to stay within {budget} prompt tokens)\n")
        if len(ids) > budget:
            user, ids = self.cut(user, len(ids) - budget, out)
        return ids, user

    def cut(self, user: str, excess: int, out: TextIO) -> tuple[str, list[int]]:
        """The message without its middle, ``excess`` tokens shorter at least (head and tail kept)."""
        tokenizer = self.loaded.tokenizer
        tokens = tokenizer.encode(user, add_special_tokens=False)
        keep = len(tokens) - excess - len(tokenizer.encode(CUT_MARK, add_special_tokens=False))
        while True:  # decoding and re-encoding at the seams may shift a token or two: shrink until it fits
            if keep < 2:
                raise ConfigError(
                    f"the system prompt and template leave no room for a message within {self.budget()} tokens "
                    f"(max_context_tokens less max_new_tokens={self.sampling.max_new_tokens})"
                )
            head, tail = tokens[: keep - keep // 2], tokens[len(tokens) - keep // 2 :]
            text = tokenizer.decode(head) + CUT_MARK + tokenizer.decode(tail)
            ids = encode(self.loaded, self.system, text, self.history)
            if len(ids) <= self.budget():
                break
            keep -= len(ids) - self.budget()
        room = self.budget() + self.sampling.max_new_tokens
        out.write(
            f"(message cut: {len(tokens)} tokens, sent its first {len(head)} and last {len(tail)} so that it and "
            f"a {self.sampling.max_new_tokens}-token answer fit in {room})\n"
        )
        return text, ids

    def reply(self, user: str, out: TextIO) -> str:
        ids, sent = self.prompt_ids(user, out)
        answer = stream_reply(self.loaded, ids, self.sampling, out)
        self.history.append((sent, answer))
        return answer

    def command(self, text: str, out: TextIO) -> bool:
        """Run a ``/command``; False ends the session."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            out.write("(history cleared)\n")
        elif name == "/system" and arg:
            self.system = arg
            out.write("(system prompt set)\n")
        elif name == "/system":
            out.write(f"(system prompt: {self.system!r})\n")
        elif name == "/role" and arg:
            try:
                self.system = system_text(self.loaded.chat, self.prompts, arg, None)
            except ConfigError as err:  # a typo must not end the conversation
                out.write(f"(error: {err})\n")
            else:
                out.write(f"(role prompt of {arg}: {self.system!r})\n")
        else:
            out.write(f"({HELP})\n")
        return True

    def handle(self, line: str, out: TextIO) -> bool:
        """One input line: a command or a message to answer; False ends the session."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text, out)
        self.reply(text, out)
        return True


def read_lines(stream: TextIO, out: TextIO, prompt: str) -> Iterator[str]:
    """Lines of ``stream``, showing ``prompt`` before each read (only for a terminal: a pipe gets no prompts)."""
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        line = stream.readline()
        if not line:
            return
        yield line


def run_session(session: ChatSession, lines: Iterable[str], out: TextIO) -> ChatSession:
    for line in lines:
        if not session.handle(line, out):
            break
    return session


def chat_command(
    model: ModelConfig | None = None,
    adapter: str | None = None,
    role: str | None = None,
    system: str | None = None,
    prompts: PromptConfig | None = None,
    decoding: SamplingConfig = GREEDY,
    max_context_tokens: int = 2048,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """Talk to a base model or a trained adapter: one message per line on stdin, answers streamed to stdout.

    Commands: /reset (forget the history), /system TEXT, /role DOMAIN, /help, /exit.

    Args:
        model: the base model (ModelConfig fields: name_or_path, chat_template, dtype ...); default the embedded
            SmolLM2-135M-Instruct.
        adapter: a saved peft adapter folder (``<log_dir>/adapter`` of a fit); none talks to the base model.
        role: answer under this domain's role prompt p_i (e.g. medical); default p_c, the central prompt.
        system: answer under this system prompt text instead.
        prompts: where p_c and the role prompts come from (lang, file, central, roles).
        decoding: max_new_tokens (longest answer), do_sample (greedy by default), temperature, top_p,
            repetition_penalty and the seed of the sampler (set once at the start).
        max_context_tokens: prompt plus answer (decoding.max_new_tokens) stay within this and the model's own limit: the
            oldest exchanges are dropped, then the middle of a too long message is cut.
        device: auto (CUDA when available), cpu or cuda[:N].
        threads: CPU threads for torch; null = default.
    """
    config = use_settings(model, threads)
    loaded = load_for_use(config, adapter, device)
    session = ChatSession(
        loaded, system_text(loaded.chat, prompts, role, system), decoding, prompts, max_context_tokens
    )
    if decoding.do_sample:
        torch.manual_seed(decoding.seed)
    if session.budget() < 1:
        raise ConfigError(
            f"decoding.max_new_tokens={decoding.max_new_tokens} leaves no room for a message within max_context_tokens="
            f"{max_context_tokens} (and the model's own limit)"
        )
    stdin = sys.stdin  # None when standard input is closed (0<&-): nothing to answer
    interactive = stdin is not None and stdin.isatty()
    print(f"chat with {config.name_or_path}{f' + {adapter}' if adapter else ''}; system prompt: {session.system!r}",
          file=sys.stderr)  # fmt: skip
    if interactive:
        print(HELP, file=sys.stderr)
    if stdin is not None:
        run_session(session, read_lines(stdin, sys.stdout, "> " if interactive else ""), sys.stdout)
