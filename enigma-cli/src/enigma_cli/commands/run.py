"""``enigma run``: answer one prompt, or chat interactively, streaming tokens."""

from __future__ import annotations

import sys
from typing import Any

import click

from enigma_cli.commands.engine_flags import engine_flags, speculative_flags, speculative_options

HELP = """\
Available commands:
  /set temperature 0.7     set a sampling parameter (temperature, top_p, top_k, min_p,
                           max_tokens, seed, repetition_penalty, presence_penalty, frequency_penalty)
  /set system <text>       set the system message
  /show                    model and current parameters (/show parameters, system, template)
  /clear                   forget the conversation so far
  /bye                     exit (or Ctrl-D)
  /?, /help                this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer.
"""
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int, "seed": int,
            "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float}


@click.command(epilog="""
\b
Examples:
  enigma run                                  chat with the default model (enigma-tiny)
  enigma run enigma-tiny "What does os.path.join do?"
  echo "Explain list comprehensions." | enigma run enigma-tiny
  enigma run qwen:0.5b --temperature 0.2 --system "Answer briefly."
""")
@click.argument("model", required=False)
@click.argument("prompt", nargs=-1)
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, help="Nucleus sampling probability mass.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (0 = all).")
@click.option("--max-tokens", type=int, help="Most tokens to generate per answer (default: up to the context).")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--system", help="System message.")
@click.option("--local", is_flag=True, help="Load the model here even when a running `enigma serve` has it.")
@speculative_flags
@engine_flags
def run(model: str | None, prompt: tuple[str, ...], local: bool, backend: str | None, scheduler: str | None,
        cache: str | None, draft: str | None, num_speculative_tokens: int | None, **options: Any) -> None:
    """Run a model: answer PROMPT and exit, or start an interactive chat.

    Reads the prompt from stdin when it is piped. MODEL defaults to the
    configured default model (enigma-tiny out of the box). A one-shot answer
    comes from a running `enigma serve` (server.host/port; ENIGMA_API_KEY if
    it needs a key) when that serves the model, else the model loads here.
    """
    from enigma.config import load_config

    config = load_config()
    model = model or config.get("models.default")
    text = " ".join(prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        text = f"{text}\n\n{piped}".strip() if text else piped.strip()
        if not text:
            raise click.UsageError("the piped prompt is empty")
    engine: dict[str, Any] = {"backend": backend, "scheduler": scheduler, "cache": cache}
    speculative = speculative_options(draft, num_speculative_tokens)
    if speculative:
        engine["speculative_config"] = speculative
    if text and not local and not any(engine.values()):
        from enigma_cli.commands.remote import answer_remotely, find_server

        base = find_server(config.get("server.host"), config.get("server.port"), model)
        if base is not None:  # a running `enigma serve` has the model loaded: no load, no torch here
            answer_remotely(base, model, text, options, sys.stdout)
            return
    session = ChatSession.open(model, config, options, engine)
    if text:
        session.answer(text, out=sys.stdout)
        return
    session.interact()


class ChatSession:
    """A loaded model, its settings and a conversation."""

    def __init__(self, llm: Any, name: str, manifest: Any, params: dict[str, Any], system: str | None) -> None:
        self.llm = llm
        self.name = name
        self.manifest = manifest
        self.params = params
        self.system = system
        self.template = manifest.template if manifest is not None else None
        self.history: list[dict[str, str]] = []

    @classmethod
    def open(cls, model: str, config: Any, options: dict[str, Any], engine: dict[str, Any]) -> ChatSession:
        from enigma.opening import engine_options, open_model

        opened = open_model(model, max_num_seqs=1, **engine_options(config, **engine))
        params: dict[str, Any] = {"max_tokens": None, **opened.defaults}
        system = options.pop("system", None) or opened.system
        params.update({key: value for key, value in options.items() if value is not None})
        session = cls(opened.llm, model, opened.manifest, params, system)
        session.sampling_params()  # bad flags fail before any prompt
        return session

    def sampling_params(self) -> Any:
        from enigma import SamplingParams

        return SamplingParams(**self.params)

    @property
    def chat_template(self) -> str | None:
        return self.template or self.llm.tokenizer.chat_template

    def prompt_ids(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        tokenizer = self.llm.tokenizer
        if self.chat_template is None and len(messages) <= 2 and messages[-1]["role"] == "user":
            text = messages[-1]["content"]  # a base model: plain completion
            return text, tokenizer.encode(text)
        text = tokenizer.apply_chat_template(messages, chat_template=self.template)
        return text, tokenizer.encode(text, add_special_tokens=False)

    def messages_for(self, user_text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def fit(self, user_text: str) -> tuple[str, list[int]]:
        """The prompt for the next turn, dropping the oldest turns if the context is full."""
        from enigma.errors import BadRequestError

        limit = self.llm.max_model_len - 16
        while True:
            text, ids = self.prompt_ids(self.messages_for(user_text))
            if len(ids) < limit:
                return text, ids
            if not self.history:
                raise BadRequestError(f"the message is {len(ids)} tokens, more than {self.name}'s context of "
                                      f"{self.llm.max_model_len} allows; shorten it")
            self.history = self.history[2:]

    def answer(self, user_text: str, *, out: Any) -> str:
        """Stream the model's answer to ``out``; Ctrl-C stops it (what was said is kept)."""
        text, ids = self.fit(user_text)
        params = self.sampling_params()
        reply = []
        stream = self.llm.stream(ids, params, prompt_text=text)
        try:
            for output in stream:
                delta = output.outputs[0].text
                if delta:
                    reply.append(delta)
                    out.write(delta)
                    out.flush()
        except KeyboardInterrupt:
            stream.close()  # aborts the request: its KV blocks go back to the pool
        finally:
            out.write("\n")
            out.flush()
        answer = "".join(reply)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    # ------------------------------------------------------------ interactive

    def interact(self) -> None:
        out = sys.stdout
        out.write(f"Chatting with {self.name}. Type /? for help, /bye to exit.\n")
        while True:
            try:
                line = self.read_message()
            except EOFError:
                out.write("\n")
                return
            except KeyboardInterrupt:
                out.write("\nUse Ctrl-D or /bye to exit.\n")
                continue
            if line is None:
                continue
            if line.startswith("/"):
                if self.command(line, out) == "bye":
                    return
                continue
            try:
                self.answer(line, out=out)
            except Exception as exc:  # one bad turn must not end the session
                from enigma.errors import EnigmaError

                if not isinstance(exc, EnigmaError):
                    raise
                out.write(f"Error: {exc}\n")

    def read_message(self) -> str | None:
        line = _input(">>> ")
        if line.strip().startswith('"""'):
            parts = [line.strip()[3:]]
            while '"""' not in parts[-1]:
                parts.append(_input("... "))
            parts[-1] = parts[-1][: parts[-1].index('"""')]
            return "\n".join(parts).strip() or None
        return line.strip() or None

    def command(self, line: str, out: Any) -> str | None:
        words = line.split()
        name = words[0].lower()
        if name in ("/bye", "/exit", "/quit"):
            return "bye"
        if name in ("/?", "/help"):
            out.write(HELP)
        elif name == "/clear":
            self.history = []
            out.write("Cleared the conversation.\n")
        elif name == "/set":
            self.set(words[1:], line, out)
        elif name == "/show":
            self.show(words[1:], out)
        else:
            out.write(f"Unknown command {words[0]!r}. Type /? for help.\n")
        return None

    def set(self, args: list[str], line: str, out: Any) -> None:
        from enigma.errors import BadRequestError

        if args and args[0] == "parameter":
            args = args[1:]
        if args and args[0] == "system":
            self.system = line.split("system", 1)[1].strip() or None
            out.write("Set system message.\n")
            return
        if len(args) != 2 or args[0] not in SETTABLE:
            out.write(f"Usage: /set <parameter> <value>, parameters: {', '.join(SETTABLE)}; or /set system <text>\n")
            return
        key, raw = args
        try:
            value = SETTABLE[key](raw)
        except ValueError:
            out.write(f"{key} needs a {SETTABLE[key].__name__}, not {raw!r}\n")
            return
        previous = self.params.get(key, _MISSING)
        self.params[key] = value
        try:
            self.sampling_params()
        except BadRequestError as exc:
            self.params.pop(key) if previous is _MISSING else self.params.__setitem__(key, previous)
            out.write(f"Error: {exc}\n")
            return
        out.write(f"Set parameter '{key}' to '{value}'.\n")

    def show(self, args: list[str], out: Any) -> None:
        what = args[0] if args else "info"
        if what in ("info", "parameters"):
            if what == "info":
                config = self.llm.loaded.hf_config
                out.write(f"  model          {self.name}\n  architecture   {self.llm.loaded.architecture}\n"
                          f"  context length {self.llm.max_model_len}\n  dtype          {self.llm.loaded.dtype}\n"
                          f"  vocab size     {config.get('vocab_size')}\n")
            out.write("  parameters\n")
            for key, value in self._shown_params():
                out.write(f"    {key:<20}{value}\n")
        elif what == "system":
            out.write((self.system or "(no system message)") + "\n")
        elif what == "template":
            out.write((self.chat_template or "(none: plain completion)") + "\n")
        else:
            out.write("Usage: /show [info|parameters|system|template]\n")

    def _shown_params(self) -> list[tuple[str, Any]]:
        params = self.sampling_params()
        return [(key, getattr(params, key)) for key in SETTABLE]


_MISSING = object()


def _input(prompt: str) -> str:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")
