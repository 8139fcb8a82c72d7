"""The FastAPI app the service mounts at /v1, whose errors have OpenAI's shape: an invalid body is a 400
naming the parameter, a stopped engine a 503, a request the model cannot serve a 400; never a 5xx with
a traceback. Its routes are the service's methods (service.py)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lmforge.serving.engine import EngineStopped, GenerationError
from lmforge.serving.protocol import error_body


def openai_api() -> FastAPI:
    app = FastAPI(title="lmforge OpenAI-compatible API")
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(EngineStopped, _engine_stopped)
    app.add_exception_handler(GenerationError, _cannot_generate)
    return app


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errors
    )
    return JSONResponse(error_body(message or "invalid request", param=param), status_code=400)


async def _engine_stopped(request: Request, exc: EngineStopped) -> JSONResponse:
    return JSONResponse(error_body(str(exc), "engine_stopped"), status_code=503)


async def _cannot_generate(request: Request, exc: GenerationError) -> JSONResponse:
    return JSONResponse(error_body(str(exc)), status_code=400)
