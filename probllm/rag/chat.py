"""`chat`: a conversation with the course assistant at the terminal, on a local model or any OpenAI-compatible
server (`probllm serve`, vLLM, ...), grounded in the notes.

The conversation is a list of turns. Each question is sent with the turns before it (as plain user/assistant
messages) and, when there are notes, the passages retrieved for it quoted as numbered sources the way `ask`
quotes them; the oldest turns are dropped first when the whole would not fit the model's context with room for
the answer. Where the notes come from:
- `--index` here: retrieved locally (the query is the question with the previous one, so a follow-up such as
  "and its worst case?" still finds its passages), whatever the model backend;
- a `probllm serve --index` server without `--index` here: the server retrieves, and the sources it returns
  with the answer (the first stream chunk's `sources`) are shown.

`--mcq`: a question written with options ("... A) joule B) newton C) watt") is answered with a letter and a
one-line reason; locally the letter is picked by each option's likelihood, as `ask` does.

The terminal loop (`run_terminal`) streams answers, lists each answer's sources, and takes /sources, /reset,
/save FILE, /help and /quit. Ctrl-C stops the answer being written (the part written stays in the conversation)
and returns to the prompt; Ctrl-D quits. A server that cannot be reached is reported in one line and the
conversation stays as it was: ask again when it is back.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

from probllm.io import UsageError
from probllm.rag.ask import LETTERS, Question, answer_prefix, build_messages, extract_letter, options_block
from probllm.rag.retrieve import citation, follow_up_query

MCQ_INSTRUCTION = ("Answer with the letter of the correct option, then one short sentence saying why, "
                   "in the form 'B. because ...'.")


# ---------------------------------------------------------------------------------------------------- model


class Unreachable(Exception):
    """The model could not answer this turn (server unreachable or refusing): the turn did not happen."""


@dataclass
class Event:
    """What the model streams for one answer: the server's sources (at most once, first) and pieces of text."""
    text: str = ""
    sources: list[dict] | None = None


class ChatModel:
    """The model a conversation talks to, through the model layer (probllm.lm, via `ask`'s Generator): a local
    transformers model, or any OpenAI-compatible server. What the conversation needs beyond text: the context
    size and a token count (to cut old turns), and whether options can be scored (the MCQ letter)."""

    def __init__(self, generator, name: str, *, base_url: str | None = None, context_tokens: int | None = None):
        self.generator = generator
        self.name = name
        self.base_url = base_url
        self.kind = "remote" if base_url else "local"
        self._context_tokens = context_tokens
        self.server_context: int | None = None

    @classmethod
    def local(cls, model: str | None = None, context_tokens: int | None = None, **generator_options) -> "ChatModel":
        from probllm.models import model_label
        from probllm.rag.ask import Generator

        generator = Generator(model, **generator_options)
        adapter = generator_options.get("adapter")
        return cls(generator, model_label(model) + (f" + {adapter}" if adapter else ""),
                   context_tokens=context_tokens)

    @classmethod
    def remote(cls, base_url: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               timeout: float = 120.0, tries: int = 2, context_tokens: int | None = None,
               **generator_options) -> "ChatModel":
        """An OpenAI-compatible server. Without `model`, the server's first model (asked when it first answers,
        so a server that is down at start is not an error)."""
        chat = cls(None, "", base_url=base_url.rstrip("/"), context_tokens=context_tokens)
        chat._remote = dict(model=model, api_key_env=api_key_env, timeout=timeout, tries=tries,
                            options=generator_options)
        chat.name = f"{model or '(the first model)'} at {chat.base_url}"
        return chat

    # ---------------------------------------------------------------------------------------- the server
    def connect(self) -> str | None:
        """For a server: ask for its models (name the model, learn its context when it says); None when it
        answered, else why not. The generator is built on the first success."""
        if self.kind == "local" or self.generator is not None:
            return None
        import openai

        from probllm.lm import BackendConfig, Retrying, RetryPolicy, make_lm
        from probllm.rag.ask import Generator

        opts = self._remote
        key = os.environ.get(opts["api_key_env"]) or "none"
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=min(opts["timeout"], 10))
        try:
            listed = list(client.models.list().data)
        except openai.AuthenticationError as e:
            raise UsageError(f"{self.base_url} refused the API key (${opts['api_key_env']}): "
                             f"{getattr(e, 'message', e)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            return f"{self.base_url} is unreachable ({type(e).__name__})"
        except openai.APIStatusError:
            listed = []  # it answers; some servers have no /models
        finally:
            client.close()
        model = opts["model"]
        if model is None:
            if not listed:
                raise UsageError(f"{self.base_url} lists no model: name one with --model")
            model = listed[0].id
        for entry in listed:
            if entry.id == model:  # vLLM says `max_model_len`; others may say `context_length`
                extra = entry.model_extra or {}
                n = extra.get("max_model_len") or extra.get("context_length")
                if isinstance(n, int) and n > 0:
                    self.server_context = n
        config = BackendConfig(backend="openai", model=model, base_url=self.base_url,
                               api_key_env=opts["api_key_env"], timeout=opts["timeout"], tries=opts["tries"])
        # Short backoffs: a person is waiting. (A stream is not retried once it has started.)
        lm = Retrying(make_lm(config), RetryPolicy(tries=opts["tries"], base=0.5))
        self.generator = Generator(model, lm=lm, **opts["options"])
        self.name = f"{model} at {self.base_url}"
        return None

    # ----------------------------------------------------------------------------------------- the context
    @property
    def context_tokens(self) -> int:
        if self._context_tokens:
            return self._context_tokens
        if self.kind == "local":
            return self.generator.lm.max_length
        return self.server_context or 4096

    def count_tokens(self, messages: list[dict]) -> int:
        if self.kind == "local":
            lm = self.generator.lm
            return len(lm.encode_prompt(lm.render(messages)))
        # No tokenizer for a remote model: a cautious estimate (3 characters a token; English runs near 4).
        return sum(len(m["content"]) // 3 + 4 for m in messages)

    # ------------------------------------------------------------------------------------------- answers
    @property
    def can_choose(self) -> bool:
        return self.generator is not None and self.generator.can_choose

    def choose_letter(self, messages: list[dict], choices: list[str]) -> int:
        return self.generator.choose_letter(messages, choices)

    def stream(self, messages: list[dict], max_new_tokens: int, prefix: str = "",
               retrieve: bool | None = None) -> Iterator[Event]:
        from probllm.lm import FatalBackendError, RequestFailed

        reason = self.connect()
        if reason:
            raise Unreachable(reason)
        extra = None
        if self.kind == "remote" and retrieve is False:
            # Notes were quoted here already: a `probllm serve --index` must not add its own.
            extra = {"probllm": {"retrieve": False}}
        try:
            for piece in self.generator.stream(self.generator.prompt(messages, prefix), max_new_tokens,
                                               extra=extra):
                if isinstance(piece, str):
                    yield Event(text=piece)
                else:  # the sources a `probllm serve --index` retrieved for this answer
                    yield Event(sources=[dict(p) for p in piece])
        except (RequestFailed, FatalBackendError) as e:
            raise Unreachable(str(e)) from None


# ---------------------------------------------------------------------------------------------- conversation


def split_options(text: str) -> tuple[str, list[str]]:
    """A question written with its options, "Unit of force? A) joule B) newton C) watt" (also "A." / "(A)" /
    one option a line), as (question, options); no options when the letters do not run A, B, C... from A."""
    marks = list(re.finditer(r"(?:(?<=\s)|^)\(?([A-J])[).:]\s+", text))
    # Keep the longest run A, B, C... that starts at an "A" mark.
    best: list[re.Match] = []
    for i, m in enumerate(marks):
        if m.group(1) != "A":
            continue
        run = [m]
        for n in marks[i + 1:]:
            if n.group(1) == LETTERS[len(run)]:
                run.append(n)
        if len(run) > len(best):
            best = run
    if len(best) < 2:
        return text.strip(), []
    question = text[:best[0].start()].strip()
    options = []
    for i, m in enumerate(best):
        end = best[i + 1].start() if i + 1 < len(best) else len(text)
        options.append(text[m.end():end].strip().rstrip(";,").strip())
    if not question or not all(options):
        return text.strip(), []
    return question, options


@dataclass
class Turn:
    question: str
    answer: str = ""
    sources: list[dict] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    letter: str | None = None
    stopped: bool = False
    history: list[dict] = field(default_factory=list)  # the earlier turns as sent with this one
    dropped_turns: int = 0                              # earlier turns cut to fit the context


class Conversation:
    """The turns so far and how one more is asked; no terminal here (see run_terminal)."""

    def __init__(self, backend, retriever=None, k: int = 4, max_new_tokens: int = 256, mcq: bool = False):
        self.backend = backend
        self.retriever = retriever
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.mcq = mcq
        self.turns: list[Turn] = []

    def reset(self) -> None:
        self.turns = []

    @property
    def last_sources(self) -> list[dict]:
        return self.turns[-1].sources if self.turns else []

    # ---------------------------------------------------------------------------------------------- prompts
    def _history(self) -> list[dict]:
        msgs: list[dict] = []
        for t in self.turns:
            msgs += [{"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer}]
        return msgs

    def _retrieve(self, question: str, choices: list[str]) -> list[dict]:
        if self.retriever is None:
            return []
        query = follow_up_query(question + "".join(f"\n{c}" for c in choices),
                                self.turns[-1].question if self.turns else None)
        hits = self.retriever.search([query], self.k)[0]
        return [{"n": i, **h} for i, h in enumerate(hits, 1)]

    def _messages(self, question: str, choices: list[str], passages: list[dict]) -> tuple[list[dict], int]:
        """The messages for this turn, earlier turns dropped oldest first to fit; and how many were dropped."""
        # Quoted here: notes retrieved here, or a local model (which has no server to add a system prompt). A
        # remote server without notes here gets the conversation only: a `serve --index` adds its own notes.
        if self.retriever is not None or self.backend.kind == "local":
            system, user = build_messages(Question(question, choices if self.mcq else [], passages,
                                                   instruction=MCQ_INSTRUCTION))
            head, tail = [system], [user]
        else:  # the server quotes its own notes and system prompt: send the conversation only
            text = question if not (self.mcq and choices) else (
                question + "\n\n" + options_block(choices, MCQ_INSTRUCTION))
            head, tail = [], [{"role": "user", "content": text}]
        history = self._history()
        budget = self.backend.context_tokens - self.max_new_tokens
        dropped = 0
        while history and self.backend.count_tokens(head + history + tail) > budget:
            history = history[2:]
            dropped += 1
        return head + history + tail, dropped

    # ------------------------------------------------------------------------------------------------ asking
    def ask(self, text: str, on_text: Callable[[str], None] = lambda s: None,
            on_sources: Callable[[list[dict]], None] = lambda s: None) -> Turn:
        """Ask one more question. The turn joins the conversation when an answer (or part of one, when Ctrl-C
        stops it) came back; Unreachable leaves the conversation as it was."""
        question, choices = split_options(text) if self.mcq else (text.strip(), [])
        passages = self._retrieve(question, choices)
        messages, dropped = self._messages(question, choices, passages)
        turn = Turn(question=text.strip(), choices=choices, history=messages[1 if messages[0]["role"] == "system"
                                                                                else 0:-1],
                    dropped_turns=dropped, sources=passages)
        if passages:
            on_sources(passages)

        mcq = self.mcq and bool(choices)
        prefix, max_new = "", self.max_new_tokens
        if mcq:
            max_new = min(self.max_new_tokens, 64)  # a letter and one line
            if self.backend.can_choose:
                index = self.backend.choose_letter(messages, choices)
                turn.letter = LETTERS[index]
                prefix = answer_prefix(Question(question, choices), index)
                on_text(prefix)
        pieces: list[str] = []
        try:
            for event in self.backend.stream(messages, max_new, prefix=prefix,
                                             retrieve=False if self.retriever else None):
                if event.sources is not None and not passages:
                    turn.sources = event.sources
                    if event.sources:
                        on_sources(event.sources)
                if event.text:
                    if mcq and "\n" in "".join(pieces) + event.text and "".join(pieces).strip():
                        break  # one line of reason is what --mcq promises
                    pieces.append(event.text)
                    on_text(event.text)
        except KeyboardInterrupt:
            turn.stopped = True
        body = "".join(pieces)
        if mcq:
            body = body.strip().splitlines()[0] if body.strip() else ""
        if prefix:
            turn.answer = (prefix + ("" if body.startswith(" ") else " ") + body).strip()
        else:
            turn.answer = body.strip()
        if mcq and turn.letter is None:
            turn.letter = extract_letter(turn.answer, len(choices))
        if turn.answer or turn.stopped:
            self.turns.append(turn)
        return turn

    # ---------------------------------------------------------------------------------------------- records
    def records(self) -> list[dict]:
        """The transcript, one record per turn, as `judge` reads it (`id`, `question`, `answer`), with the
        history each question was asked with and its sources."""
        out = []
        model = getattr(self.backend, "name", None)
        for n, t in enumerate(self.turns, 1):
            rec = {"id": f"turn-{n}", "turn": n, "question": t.question, "answer": t.answer,
                   "history": t.history, "context_ids": [s.get("id") for s in t.sources],
                   "sources": t.sources, "model": model}
            if t.choices:
                rec["choices"] = t.choices
                rec["answer_letter"] = t.letter
            if t.stopped:
                rec["stopped"] = True
            if t.dropped_turns:
                rec["dropped_turns"] = t.dropped_turns
            out.append(rec)
        return out

    def save(self, path: str) -> int:
        from probllm.io import write_jsonl

        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        return write_jsonl(path, self.records())


# ------------------------------------------------------------------------------------------------- terminal

HELP = """Commands:
  /sources      the passages behind the last answer, in full
  /reset        forget the conversation and start over
  /save FILE    write the conversation as JSONL (one record per turn; `probllm judge` reads it)
  /help         this list
  /quit         leave (Ctrl-D too)
Ctrl-C stops an answer that is being written."""


class _Style:
    """ANSI styling when the output is a terminal (and NO_COLOR is unset); plain text otherwise."""

    def __init__(self, stream):
        self.on = stream.isatty() and not os.environ.get("NO_COLOR")

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text

    def dim(self, text: str) -> str:
        return self(text, "2")

    def bold(self, text: str) -> str:
        return self(text, "1")

    def red(self, text: str) -> str:
        return self(text, "31")


def format_sources_line(sources: list[dict]) -> str:
    return "Sources:\n" + "\n".join(f"  [{s.get('n', i)}] {citation(s)}" for i, s in enumerate(sources, 1))


def format_sources_full(sources: list[dict]) -> str:
    if not sources:
        return "No sources for the last answer."
    blocks = []
    for i, s in enumerate(sources, 1):
        score = s.get("score")
        head = f"[{s.get('n', i)}] {citation(s)}" + (f"  (score {score:.3f})" if isinstance(score, float) else "")
        text = "\n".join("    " + line for line in str(s.get("text", "")).strip().splitlines())
        blocks.append(head + "\n" + text)
    return "\n\n".join(blocks)


def run_terminal(conversation: Conversation, *, stdin=None, out=None, err=None,
                 prompt: str = "you> ") -> int:
    """The interactive loop; returns the number of questions answered."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    err = err or sys.stderr
    style = _Style(out)
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass

    def say(text: str, to=None) -> None:
        print(text, file=to or out, flush=True)

    answered = 0
    while True:
        try:
            line = input(style.bold(prompt)) if interactive else stdin.readline()
            if not interactive and line == "":
                raise EOFError
        except EOFError:
            if interactive:
                say("")
            break
        except KeyboardInterrupt:
            say("")  # Ctrl-C at the prompt: a fresh line, like a shell
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            cmd, arg = cmd.lower(), arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                break
            elif cmd == "/help":
                say(HELP)
            elif cmd == "/reset":
                conversation.reset()
                say(style.dim("(conversation cleared: the next question starts afresh)"))
            elif cmd == "/sources":
                say(format_sources_full(conversation.last_sources))
            elif cmd == "/save":
                if not arg:
                    say(style.red("usage: /save FILE"), err)
                elif not conversation.turns:
                    say(style.red("nothing to save yet"), err)
                else:
                    try:
                        n = conversation.save(arg)
                        say(style.dim(f"(saved {n} turn{'s' if n != 1 else ''} to {arg})"))
                    except OSError as e:
                        say(style.red(f"cannot write {arg}: {e.strerror or e}"), err)
            else:
                say(style.red(f"unknown command {cmd}; /help lists them"), err)
            continue

        started = [False]

        def on_text(piece: str) -> None:
            started[0] = True
            out.write(piece)
            out.flush()

        try:
            turn = conversation.ask(line, on_text=on_text)
        except Unreachable as e:
            if started[0]:
                say("")
            if "unreachable" in str(e):
                say(style.red(f"Cannot reach the model: {e}. The conversation is kept: ask again when the server "
                              "is back."), err)
            else:
                say(style.red(f"The model could not answer: {e}"), err)
            continue
        except KeyboardInterrupt:  # Ctrl-C before the first token (retrieval, prompt building)
            say(style.dim("\n(stopped)"))
            continue
        if started[0]:
            say("")
        if turn.stopped:
            say(style.dim("(stopped)"))
        elif not turn.answer:
            say(style.dim("(the model returned an empty answer)"))
        if turn.sources:
            say(style.dim(format_sources_line(turn.sources)))
        if turn.dropped_turns:
            say(style.dim(f"(the {turn.dropped_turns} oldest turn{'s' if turn.dropped_turns > 1 else ''} no "
                          "longer fit the model's context and were left out)"))
        if turn.answer or turn.stopped:
            answered += 1
    return answered


def banner(conversation: Conversation, index: str | None) -> str:
    parts = [f"probllm chat: {conversation.backend.name}"]
    if index:
        parts.append(f"notes from {index}")
    if conversation.mcq:
        parts.append("MCQ mode")
    return ", ".join(parts) + ". /help lists the commands; Ctrl-D quits."

