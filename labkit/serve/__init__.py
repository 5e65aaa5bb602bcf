"""Serving: the OpenAI-compatible api_server, its terminal client and the Gradio UI.

    cli.py          flags of `labkit serve ...` (light)
    api_server.py   engine + uvicorn, signals            app.py       FastAPI routes
    protocol.py     request/response bodies (pydantic)   errors.py    OpenAI error envelope
    interactive.py  /v1/chat/interactive                 sessions.py  its sessions (kept KV)
    metrics.py      /metrics (prometheus-client)         api_client.py  terminal client
    gradio_app.py   Gradio ChatInterface, on the API server or on a local engine

Importing this package imports nothing heavy; FastAPI, uvicorn and Gradio load with the module
that needs them.
"""
