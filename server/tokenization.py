"""Text <-> token ids for the server: prompt encoding, the chat template, an
incremental detokenizer and stop-string matching. The backend knows no text;
everything textual happens here.
"""

from __future__ import annotations

from typing import Any, Sequence

from server.errors import InvalidRequest

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded alongside the output, so that tokenizers which drop a
# leading space at the start of a decode (SentencePiece) keep it mid-text.
CONTEXT_TOKENS = 5


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A completion prompt: the tokenizer's own special tokens (BOS) included."""
    return list(tokenizer.encode(text))


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Chat messages through the model's chat template, ending with the assistant's turn
    (a new one, or with continue_final_message the last message, left open: a prefill).
    template_kwargs are extra variables for the template (e.g. enable_thinking)."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # no template, a template's raise_exception, a jinja error
        raise InvalidRequest(f"could not apply the model's chat template: {exc}", param="messages") from exc
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode_prompt(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The text of a prompt given as token ids (for echo)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=False)


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token as text, for logprobs. Special tokens are shown; a token that
    holds part of a character is written as its bytes, OpenAI style:
    "bytes:\\xf0\\x9f" (so distinct partial tokens keep distinct names)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if REPLACEMENT_CHAR in text:
        raw = token_bytes(tokenizer, token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    from tokenizers.decoders import ByteLevel

    return isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), ByteLevel)


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """One token's raw bytes (a byte-level token may hold part of a character)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if token_id not in added and _is_byte_level(tokenizer):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


class IncrementalDetokenizer:
    """Turn a stream of token ids into text pieces whose concatenation equals
    decoding the whole stream at once (special tokens skipped).

    vLLM's scheme: decode a short window [prefix:] and the part of it already
    emitted [prefix:read]; the difference is the new text. A window that ends
    in U+FFFD is an incomplete UTF-8 sequence (an emoji split over byte
    tokens): hold it back until the bytes that complete it arrive.
    `skip_special_tokens` / `spaces_between_special_tokens` go to the
    tokenizer's decode (vLLM's request options; a byte-level tokenizer puts no
    spaces between special tokens either way).
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = (), *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._options = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        context = list(context_ids)[-CONTEXT_TOKENS:] if CONTEXT_TOKENS else []
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt ending mid-character would shift every offset
        self._ids = context
        self._prefix = 0  # ids[prefix:read] is decoded only to align the window
        self._read = len(context)  # ids[read:] not emitted yet
        self._prefix_text = self._decode(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), **self._options)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """At the end of the stream: whatever is held back (an incomplete
        character decodes to U+FFFD, as a full decode would)."""
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        if self._prefix > 256:  # keep the id list short on long generations
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new


class StopStringMatcher:
    """Cut the output at the first stop string, even one spanning several
    tokens: text that could be the start of a stop string is held back until
    it either completes one (the output ends before it, or after it with
    `include_stop`) or cannot anymore.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self._stops = [s for s in stops if s]
        self._include_stop = include_stop
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit).
        After a hit the returned text ends right before the stop string (right
        after it with include_stop)."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        # Nothing emitted earlier can start a stop string (it would have been
        # held), so searching the buffer is enough.
        hits = [(i, len(s)) for i, s in ((buffer.find(s), s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            start, length = min(hits)
            return buffer[: start + length if self._include_stop else start], True
        hold = max(self._partial_suffix(buffer, s) for s in self._stops)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """At the end of the output: release what was held back."""
        pending, self._pending = self._pending, ""
        return pending

    @staticmethod
    def _partial_suffix(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
