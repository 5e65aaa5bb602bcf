"""Interactive sessions of `/v1/chat/interactive` (lmdeploy 0.1's stateful chat).

A session is a conversation the server remembers: its messages, the exact token ids the
engine has seen (last prompt + last answer, as TurboMind keeps a session's tokens), and a
KVHold with the KV blocks of those tokens pinned in the engine (AsyncEngine.add(..., hold=)).
A new turn is those ids + the chat template's markup that closes the answer and opens the new
turn (`turn_ids`), so its prefix is exactly what the pinned blocks hold: the engine computes
only the new tokens (plus the last, partly filled block of the old ones).

One turn runs per session at a time. `interactive_mode=false` ends a session after its turn
and frees its blocks. Sessions idle longer than `idle_timeout` seconds, and the least
recently used beyond `max_sessions`, are ended too, so forgotten sessions cannot fill the cache.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from labkit.engine.async_engine import AsyncEngine, KVHold


@dataclass(eq=False)
class ChatSession:
    session_id: int
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)   # what the engine saw, in order
    hold: KVHold = field(default_factory=KVHold)
    request_id: str | None = None          # the engine request of the last turn (None: queuing)
    turn_open: bool = False                # a turn was started and has not ended
    last_used: float = field(default_factory=time.monotonic)
    turns: int = 0


class SessionStore:
    def __init__(self, aeng: AsyncEngine, max_sessions: int = 256, idle_timeout: float = 3600.0):
        self.aeng = aeng
        self.max_sessions, self.idle_timeout = max_sessions, idle_timeout
        self._sessions: dict[int, ChatSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def busy(self, s: ChatSession) -> bool:
        """A turn of this session is being queued or is in the engine. (A turn whose client
        left before reading a single line is aborted, so it does not keep the session busy.)"""
        return s.turn_open and (s.request_id is None or self.aeng.is_live(s.request_id))

    def find(self, session_id: int) -> ChatSession | None:
        return self._sessions.get(session_id)

    def get(self, session_id: int) -> ChatSession:
        """The session with this id, made if new; -1 makes a new one with a fresh id."""
        self._expire()
        if session_id == -1:
            session_id = self._fresh_id()
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = ChatSession(session_id)
        s.last_used = time.monotonic()
        return s

    def end(self, session: ChatSession) -> None:
        """Forget the conversation and give its KV blocks back."""
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        session.messages, session.token_ids = [], []
        self.aeng.release(session.hold)

    def close(self) -> None:
        for s in list(self._sessions.values()):
            self.end(s)

    def _fresh_id(self) -> int:
        while True:
            sid = random.randint(1, 2**31 - 1)
            if sid not in self._sessions:
                return sid

    def _expire(self) -> None:
        now = time.monotonic()
        idle = [s for s in self._sessions.values()
                if not self.busy(s) and now - s.last_used > self.idle_timeout]
        for s in idle:
            self.end(s)
        spare = sorted((s for s in self._sessions.values() if not self.busy(s)), key=lambda s: s.last_used)
        while len(self._sessions) >= self.max_sessions and spare:
            self.end(spare.pop(0))


def turn_ids(tokenizer, session: ChatSession, new: list[dict]) -> list[int]:
    """Token ids of the session's next turn: the ids it has + the template's markup that
    closes the last answer and opens `new` (the template rendered around the answer, so
    nothing is re-tokenized). Falls back to rendering the whole conversation afresh when the
    template does not render turns as prefixes of each other."""
    if not session.token_ids:
        return tokenizer.apply_chat_template(session.messages + new)
    history, reply = session.messages[:-1], session.messages[-1]
    before = tokenizer.render_chat(history, add_generation_prompt=True)
    closed = tokenizer.render_chat(session.messages, add_generation_prompt=False)
    full = tokenizer.render_chat(session.messages + new, add_generation_prompt=True)
    if not (closed.startswith(before + reply["content"]) and full.startswith(closed)):
        return tokenizer.apply_chat_template(session.messages + new)
    markup = closed[len(before) + len(reply["content"]):] + full[len(closed):]
    last = session.token_ids[-1]              # the end-of-turn token the model wrote, if any
    if last in tokenizer.stop_token_ids:
        end = tokenizer.decode([last], skip_special_tokens=False)
        markup = markup[len(end):] if markup.startswith(end) else markup
    return session.token_ids + tokenizer.encode(markup)
