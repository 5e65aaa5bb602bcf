"""`labkit serve api_client URL`: the lesson's terminal client of an api_server.

It chats through `/v1/chat/interactive` (lmdeploy 0.1's client does the same): each line you
type is one turn of a session the server keeps, history and KV included, so only the new
message travels and is computed. The answer streams back as NDJSON. `end` ends the session
(the server frees its KV) and starts a new one, `exit` quits. Piped stdin works (one message
per line), so scripts and tests can drive it.
"""
from __future__ import annotations

import json
import sys

BANNER = ("labkit api_client: type a message and press Enter; 'end' resets the session, "
          "'exit' quits.")


class ServerUnreachable(ValueError):
    """The api_server cannot be reached or refused the request (one-line CLI error)."""


class InteractiveClient:
    """One session of /v1/chat/interactive."""

    def __init__(self, url: str, api_key: str | None = None, session_id: int = -1,
                 timeout: float = 600.0):
        import httpx
        self.url = url.rstrip("/") + "/v1/chat/interactive"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)
        self.session_id = session_id
        self.last: dict = {}                  # the last NDJSON line of the last turn
        self._session_len: int | None = None

    def session_len(self) -> int | None:
        """The server's session_len (max_model_len in /v1/models), if it says."""
        if self._session_len is None:
            try:
                r = self.http.get(self.url.replace("/chat/interactive", "/models"))
                self._session_len = r.json()["data"][0].get("max_model_len") or 0
            except Exception:
                self._session_len = 0
        return self._session_len or None

    def _post(self, body: dict):
        return self.http.stream("POST", self.url, json=body | {"session_id": self.session_id})

    def turn(self, prompt: str, **sampling):
        """Send one message; yield the answer's text pieces as they arrive."""
        import httpx
        body = {"prompt": prompt, "interactive_mode": True, "stream": True, **sampling}
        try:
            with self._post(body) as r:
                if r.status_code != 200:
                    raise ServerError(_error_message(r.read()), r.status_code)
                for raw in r.iter_lines():
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    if "error" in line:
                        raise ServerError(line["error"]["message"], 500)
                    self.session_id, self.last = line["session_id"], line
                    yield line["text"]
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach {self.url} ({type(e).__name__}): is the "
                                    f"api_server running?") from None

    def end(self) -> None:
        """End the session: the server forgets it and frees its KV blocks."""
        import httpx
        if self.session_id == -1:
            return
        try:
            with self._post({"prompt": "", "interactive_mode": False}) as r:
                r.read()
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach {self.url} ({type(e).__name__})") from None

    def close(self) -> None:
        self.http.close()


class ServerError(RuntimeError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except Exception:
        return body.decode(errors="replace")[:300]


def run_client(client: InteractiveClient, sampling: dict, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    print(BANNER, file=stdout, flush=True)
    turn = 0
    while True:
        if interactive:
            print(f"\n[{turn}] >>> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        prompt = line.strip()
        if not prompt:
            continue
        if prompt == "exit":
            break
        if prompt == "end":
            client.end()
            turn = 0
            print("(session reset)", file=stdout, flush=True)
            continue
        if not interactive:
            print(f"[{turn}] >>> {prompt}", file=stdout)
        try:
            for piece in client.turn(prompt, **sampling):
                print(piece, end="", file=stdout, flush=True)
        except ServerError as e:
            print(f"(the server refused this turn: {e}" + ("; type 'end' to start a new session)"
                  if "session_len" in str(e) else ")"), file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)
        last, limit = client.last, client.session_len()
        if limit and last.get("input_tokens", 0) + last.get("tokens", 0) >= limit - 1:
            print(f"(this session reached session_len={limit} tokens; type 'end' to start a new "
                  f"one)", file=stdout, flush=True)
        turn += 1
    try:
        client.end()                          # free the session's KV on the server
    except ServerUnreachable:
        pass
    return 0


def main(args) -> int:
    sampling = {"request_output_len": args.max_new_tokens,
                "temperature": args.temperature if args.do_sample else 0.0,
                "top_p": args.top_p, "top_k": args.top_k,
                "repetition_penalty": args.repetition_penalty}
    if args.seed is not None:
        sampling["seed"] = args.seed
    client = InteractiveClient(args.url, args.api_key, args.session_id, args.timeout)
    try:
        return run_client(client, sampling)
    finally:
        client.close()
