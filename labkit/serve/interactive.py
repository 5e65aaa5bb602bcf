"""`POST /v1/chat/interactive`: lmdeploy 0.1's stateful chat, the route the course's
`api_client` talks to.

    {"prompt": "Hi", "session_id": 7, "interactive_mode": true, "stream": true}

- interactive_mode=true: the server keeps the session (its messages and the KV of its last
  turn, sessions.py) after this turn; the next turn sends only its new message.
- interactive_mode=false: this turn (if its prompt is not empty) runs with the session's
  history, then the session ends and its KV blocks are freed. `{"prompt": "",
  "interactive_mode": false}` just ends it: that is what the client's `end` sends.
- stop=true: abort the session's running turn.
- session_id=-1 picks a new id, returned in every answer.

Answers are NDJSON lines `{"text", "tokens", "finish_reason", "session_id", "input_tokens",
"prefix_hit_tokens"}` (one per new piece of text when streaming, else one line with the whole
text). prefix_hit_tokens shows the kept KV at work: on a follow-up turn it covers the earlier
conversation, so only the new tokens were computed.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from labkit.engine.async_engine import EngineError
from labkit.serve import protocol as P
from labkit.serve.app import ServerState, unless_disconnected
from labkit.serve.errors import APIError, bad_request
from labkit.serve.sessions import turn_ids


def add_interactive_route(router: APIRouter, state: ServerState) -> None:
    @router.post("/chat/interactive", response_model=P.InteractiveChunk)
    async def chat_interactive(req: P.InteractiveRequest, raw: Request):
        if req.stop:
            s = state.sessions.find(req.session_id)
            if s is not None and state.sessions.busy(s) and s.request_id:
                await asyncio.wrap_future(state.aeng.abort(s.request_id))
            return P.InteractiveChunk(text="", tokens=0, finish_reason="abort" if s else None,
                                      session_id=req.session_id)
        new = req.messages()
        session = state.sessions.get(req.session_id)
        sid = session.session_id
        if state.sessions.busy(session):
            raise bad_request(f"session_id={sid} is busy with another request: wait for it, or "
                              f"send stop=true", "session_id", "session_busy")
        if not new:
            if req.interactive_mode:
                raise bad_request("prompt must not be empty (send interactive_mode=false with an "
                                  "empty prompt to end the session)", "prompt")
            state.sessions.end(session)
            return P.InteractiveChunk(text="", tokens=0, finish_reason="stop", session_id=sid)
        messages = session.messages + new
        try:
            ids = state.check_length(turn_ids(state.tokenizer, session, new), "prompt")
        except APIError as e:
            if e.code == "context_length_exceeded" and session.messages:
                e.message += f"; session {sid} is full: end it with interactive_mode=false"
            raise
        except Exception as e:                        # the chat template refused the messages
            raise bad_request(f"prompt: {e}", "prompt") from None
        gc = req.generation_config(state.max_tokens(ids, req.request_output_len))
        rid = P.new_id(f"session-{sid}")
        session.turn_open, session.request_id = True, None     # busy from here on
        hold = session.hold if req.interactive_mode else None
        try:
            outputs = await state.start(ids, gc, rid, "interactive", hold=hold)
        except BaseException:
            session.turn_open = False
            raise
        session.request_id = rid

        def line(out, text: str) -> P.InteractiveChunk:
            return P.InteractiveChunk(text=text, tokens=len(out.token_ids),
                                      finish_reason=out.finish_reason if out.finished else None,
                                      session_id=sid, input_tokens=out.num_prompt_tokens,
                                      prefix_hit_tokens=out.num_prefix_hit_tokens)

        def after_turn(out) -> None:
            session.turn_open = False
            if out is not None and out.finished and out.finish_reason != "abort":
                session.messages = messages + [{"role": "assistant", "content": out.text}]
                session.token_ids = ids + out.token_ids
                session.turns += 1
            if not req.interactive_mode:
                state.sessions.end(session)

        if req.stream:
            async def ndjson():
                out = None
                try:
                    async for out in outputs:
                        if out.delta_text or out.finished:
                            yield line(out, out.delta_text).model_dump_json() + "\n"
                except EngineError as e:
                    yield APIError(500, str(e), code="engine_error").response().body.decode() + "\n"
                finally:
                    after_turn(out)
            return StreamingResponse(ndjson(), media_type="application/x-ndjson")

        async def whole():
            out = None
            try:
                async for out in outputs:
                    pass
            except EngineError as e:
                raise APIError(500, str(e), code="engine_error") from None
            finally:
                after_turn(out)
            return out
        out = await unless_disconnected(raw, whole())
        return out if isinstance(out, Response) else line(out, out.text)
