"""The framework ceiling for the ingest benchmark: a trivial Flask endpoint that parses a JSON
body and answers 201 with a small JSON body, served by the same gunicorn setup as the service."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@app.post("/echo")
def echo() -> tuple[Response, int]:
    body = request.get_json(force=True)
    return jsonify(received=len(body) if isinstance(body, dict) else 0), 201
